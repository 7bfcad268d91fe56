//! Which blocks get which feed-forward layer: `--layers "0-5:featural,6-11:associative"`.
//! Blocks not named keep GPT-2's MLP.

use std::str::FromStr;

use crate::{DmtError, Result};

/// The feed-forward layer of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerKind {
    /// GPT-2's MLP (the teacher's).
    Mlp,
    /// A featural memory layer.
    Featural,
    /// A featural memory layer whose table is a product-key grid
    /// ([`super::product`]): `n²` rows per head searched through `2·n`
    /// sub-keys.
    Product,
    /// An associative memory layer.
    Associative,
    /// A key-value memory layer (an MLP's units as memory rows).
    KeyValue,
    /// No feed-forward layer (ablation).
    Ablated,
}

impl FromStr for LayerKind {
    type Err = DmtError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "mlp" => Ok(LayerKind::Mlp),
            "featural" => Ok(LayerKind::Featural),
            "product" => Ok(LayerKind::Product),
            "associative" => Ok(LayerKind::Associative),
            "keyvalue" => Ok(LayerKind::KeyValue),
            "none" | "ablated" => Ok(LayerKind::Ablated),
            other => Err(DmtError::InvalidArgument(format!(
                "unknown layer kind {other:?} (expected mlp, featural, product, associative, keyvalue or none)"
            ))),
        }
    }
}

/// How a memory layer's table starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryInit {
    /// Filled to capacity from the teacher's feed-forward layer before the
    /// first step (keys: projected inputs; values: its outputs).
    Teacher,
    /// Empty: the memory grows while the model trains, by novelty-gated
    /// insertion and recombination, up to its capacity, then evicts by LRFU.
    Empty,
    /// Filled to capacity with random unit keys and small random values (an
    /// ablation).
    Random,
}

impl MemoryInit {
    /// The name `FromStr` takes.
    pub fn name(self) -> &'static str {
        match self {
            MemoryInit::Teacher => "teacher",
            MemoryInit::Empty => "empty",
            MemoryInit::Random => "random",
        }
    }
}

impl FromStr for MemoryInit {
    type Err = DmtError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "teacher" => Ok(MemoryInit::Teacher),
            "empty" => Ok(MemoryInit::Empty),
            "random" => Ok(MemoryInit::Random),
            other => Err(DmtError::InvalidArgument(format!(
                "unknown memory start {other:?} (expected teacher, empty or random)"
            ))),
        }
    }
}

/// Parses a layer plan for a model of `n_layer` blocks: comma-separated
/// `RANGE:KIND` items, RANGE being `i` or `i-j` (inclusive). A block may be
/// named once.
pub fn parse_layers(spec: &str, n_layer: usize) -> Result<Vec<LayerKind>> {
    let bad = |m: String| DmtError::InvalidArgument(format!("--layers {spec:?}: {m}"));
    let mut plan = vec![LayerKind::Mlp; n_layer];
    let mut named = vec![false; n_layer];
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (range, kind) = item
            .split_once(':')
            .ok_or_else(|| bad(format!("item {item:?} is not RANGE:KIND")))?;
        let kind: LayerKind = kind.parse()?;
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("{s:?} is not a block index")))
        };
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(range)?, num(range)?),
        };
        if a > b {
            return Err(bad(format!("range {a}-{b} is backwards")));
        }
        if b >= n_layer {
            return Err(bad(format!("block {b} does not exist (the model has {n_layer})")));
        }
        for i in a..=b {
            if named[i] {
                return Err(bad(format!("block {i} is named twice")));
            }
            named[i] = true;
            plan[i] = kind;
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use LayerKind::*;

    #[test]
    fn parses_ranges_and_keeps_unnamed_blocks() {
        assert_eq!(
            parse_layers("0-5:featural,6-11:associative", 12).unwrap(),
            [vec![Featural; 6], vec![Associative; 6]].concat()
        );
        assert_eq!(
            parse_layers("1:none, 3:featural", 4).unwrap(),
            vec![Mlp, Ablated, Mlp, Featural]
        );
        assert_eq!(parse_layers("0:product", 2).unwrap(), vec![Product, Mlp]);
        assert_eq!(parse_layers("", 2).unwrap(), vec![Mlp, Mlp]);
    }

    #[test]
    fn refuses_bad_plans() {
        for spec in [
            "0-12:featural",
            "0-2:featural,2:mlp",
            "3-1:mlp",
            "x:mlp",
            "0:magic",
            "0featural",
        ] {
            assert!(parse_layers(spec, 12).is_err(), "{spec} was accepted");
        }
    }
}
