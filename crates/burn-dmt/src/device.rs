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
    /// What was picked, e.g. "cpu (burn flex backend)" or the adapter's name.
    pub description: String,
    /// The adapter's largest storage-buffer binding in bytes (wgpu only):
    /// no single tensor may be larger.
    pub max_binding_bytes: Option<u64>,
}

impl Selected {
    /// Checks that a tensor of `bytes` fits the device's binding limit.
    pub fn check_fits(&self, what: &str, bytes: u64) -> Result<()> {
        match self.max_binding_bytes {
            Some(max) if bytes > max => Err(DmtError::Device(format!(
                "{what} needs {bytes} bytes in one buffer, more than this adapter's limit of {max} \
                 ({}); use --device cpu",
                self.description
            ))),
            _ => Ok(()),
        }
    }
}

fn cpu(note: &str) -> Selected {
    Selected {
        device: Device::flex(),
        description: format!("cpu (burn flex backend){note}"),
        max_binding_bytes: None,
    }
}

/// Resolves a choice to a device, saying which one was picked. `auto` takes
/// the first discrete (else integrated) GPU adapter and otherwise the CPU
/// backend: a software Vulkan driver such as lavapipe is slower than flex.
/// `wgpu` takes a GPU adapter, or a CPU one if that is all there is.
pub fn select(choice: DeviceChoice) -> Result<Selected> {
    match choice {
        DeviceChoice::Cpu => Ok(cpu("")),
        DeviceChoice::Wgpu => gpu::pick(true).ok_or_else(|| {
            DmtError::Device(if cfg!(feature = "wgpu") {
                "no wgpu adapter found (without a GPU, install Mesa's lavapipe: mesa-vulkan-drivers)".into()
            } else {
                "this build has no wgpu support (build with --features wgpu)".into()
            })
        }),
        DeviceChoice::Auto => Ok(gpu::pick(false).unwrap_or_else(|| {
            cpu(if cfg!(feature = "wgpu") {
                "; no hardware GPU adapter found (software ones such as lavapipe are skipped: slower than flex)"
            } else {
                "; built without wgpu"
            })
        })),
    }
}

#[cfg(feature = "wgpu")]
mod gpu {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    use burn::tensor::{Device, DeviceKind};

    use super::Selected;

    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Runs a future to completion on this thread.
    fn block_on<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    /// The best adapter: a discrete GPU, else an integrated one, else (only
    /// when `allow_cpu`) a CPU adapter.
    pub fn pick(allow_cpu: bool) -> Option<Selected> {
        use wgpu::DeviceType as T;
        let instance = wgpu::Instance::default();
        let adapters = block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
        let infos: Vec<(wgpu::AdapterInfo, u64)> = adapters
            .iter()
            .map(|a| (a.get_info(), a.limits().max_storage_buffer_binding_size))
            .collect();
        let nth = |t: T| infos.iter().filter(|(i, _)| i.device_type == t).enumerate().next();
        let (kind, (info, max)) = if let Some((i, x)) = nth(T::DiscreteGpu) {
            (DeviceKind::DiscreteGpu(i), x)
        } else if let Some((i, x)) = nth(T::IntegratedGpu) {
            (DeviceKind::IntegratedGpu(i), x)
        } else if allow_cpu && let Some((_, x)) = nth(T::Cpu) {
            (DeviceKind::Cpu, x)
        } else {
            return None;
        };
        Some(Selected {
            device: Device::wgpu(kind),
            description: format!("wgpu: {} ({:?}, {:?})", info.name, info.backend, info.device_type),
            max_binding_bytes: Some(*max),
        })
    }
}

#[cfg(not(feature = "wgpu"))]
mod gpu {
    use super::Selected;

    /// No wgpu in this build.
    pub fn pick(_allow_cpu: bool) -> Option<Selected> {
        None
    }
}
