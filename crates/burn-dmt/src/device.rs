//! Device selection: `--device auto|cpu|wgpu`. The CPU backend is Burn's
//! pure-Rust `flex` (measured 1.6× faster than `ndarray` on a GPT-2 forward
//! here); wgpu is compiled in with the `wgpu` feature.

use burn::tensor::Device;

use crate::{DmtError, Result};

/// Which device to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// wgpu when compiled in and an adapter exists, else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// wgpu (requires the `wgpu` feature and an adapter).
    Wgpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = DmtError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "wgpu" => Ok(DeviceChoice::Wgpu),
            _ => Err(DmtError::InvalidArgument(format!(
                "unknown device {s:?} (expected auto, cpu or wgpu)"
            ))),
        }
    }
}

/// A resolved device and a human-readable description of it.
pub struct Selected {
    /// The device.
    pub device: Device,
    /// What was picked, e.g. "cpu (burn flex)".
    pub description: String,
}

/// Resolves a choice to a device, saying which one was picked.
pub fn select(choice: DeviceChoice) -> Result<Selected> {
    let cpu = || Selected {
        device: Device::flex(),
        description: "cpu (burn flex backend)".into(),
    };
    match choice {
        DeviceChoice::Cpu => Ok(cpu()),
        DeviceChoice::Wgpu => wgpu().ok_or_else(|| {
            DmtError::Device(if cfg!(feature = "wgpu") {
                "no wgpu adapter found".into()
            } else {
                "this build has no wgpu support (build with --features wgpu)".into()
            })
        }),
        DeviceChoice::Auto => Ok(wgpu().unwrap_or_else(cpu)),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Option<Selected> {
    use burn::tensor::{DeviceKind, Tensor};
    // Creating the device is lazy; running one small op tells whether an
    // adapter exists. A failure surfaces as a panic inside the runtime.
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let probe = std::panic::catch_unwind(|| {
        let t = Tensor::<1>::from_floats([1.0f32, 2.0], &device);
        t.sum().into_scalar::<f32>()
    });
    match probe {
        Ok(v) if (v - 3.0).abs() < 1e-6 => Some(Selected {
            device,
            description: "wgpu (default adapter)".into(),
        }),
        _ => None,
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Option<Selected> {
    None
}
