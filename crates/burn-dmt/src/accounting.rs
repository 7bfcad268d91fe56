//! What a model costs at inference, block by block: trained weights, memory
//! rows and floats, bytes on disk and multiply-adds per token of each
//! feed-forward layer (a dense MLP, a memory layer, or none), and the
//! model's totals.
//!
//! A memory layer's table is not a weight (no optimiser updates it as a
//! whole), but a model needs every float of it at inference, so a fair
//! comparison with a dense model counts both: [`Accounting::weights`] and
//! [`Accounting::weights_and_memory`]. Multiply-adds count the products a
//! forward pass at inference needs for one token (as FLOP counts in scaling
//! studies do, Kaplan et al. 2020): for an MLP of width `f` over `c`
//! features, `2·c·f`; for a memory layer, its projections (`c²` each),
//! the exact search of each head's query against the rows that head can
//! retrieve (`rows · dh` per head), and the `k` retrieved rows' distances
//! and weighted sum (`2·k·dh` per head); for a key-value layer, every row's
//! score (`c + 1`), then the `k` retrieved rows' scores and values; for a
//! product-key layer ([`crate::memory::product`]), the search of each
//! head's `2·n` half-width sub-keys and its `min(k, n)²` candidates, and
//! its floats are the values and the sub-keys. An
//! associative layer's value
//! projection is needed only to propose new memories while learning, so
//! its products are not counted at inference (its weights are).

use burn::module::Module;

use crate::{FeedForward, Gpt2};

/// One block's feed-forward layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerCost {
    /// The block.
    pub block: usize,
    /// What the layer is (`mlp 512`, `featural`, `associative`, `none`).
    pub kind: String,
    /// Its trained weights (parameters the optimiser updates).
    pub weights: usize,
    /// Memory rows held.
    pub memory_rows: usize,
    /// Floats of those rows (keys and values).
    pub memory_floats: usize,
    /// Multiply-adds per token at inference.
    pub macs_per_token: u64,
}

/// A model's inference cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Accounting {
    /// Every trained weight (embeddings included).
    pub all_weights: usize,
    /// Trained weights without the token and position embeddings.
    pub weights: usize,
    /// Each block's feed-forward layer.
    pub layers: Vec<LayerCost>,
    /// Multiply-adds per token of the attention layers, the LM head and,
    /// when the model has it, layerwise feedback.
    pub shared_macs_per_token: u64,
}

impl Accounting {
    /// Counts `model` (with `k` memories retrieved per head by its memory
    /// layers; the layers know their own tables).
    pub fn of(model: &Gpt2) -> Self {
        let config = model.config();
        let (c, h) = (config.n_embd as u64, config.n_head as u64);
        let dh = c / h.max(1);
        let layers = model
            .h
            .iter()
            .enumerate()
            .map(|(block, b)| {
                let weights = b.mlp.num_params();
                let (kind, rows, floats, macs) = match &b.mlp {
                    FeedForward::Mlp(m) => {
                        let f = m.c_fc.weight.val().dims()[1] as u64;
                        (format!("mlp {f}"), 0, 0, 2 * c * f)
                    }
                    FeedForward::Ablated(_) => ("none".to_string(), 0, 0, 0),
                    FeedForward::Featural(f) if f.memory().product_keys().is_some() => {
                        // Product keys: each head's query against its 2·n
                        // sub-keys of dh/2 (n·dh), the k_h² candidates' full
                        // distances (k_h = min(k, n)), the k retrieved rows'
                        // distances and sum; the keys needed are the
                        // sub-keys, not the stored full keys.
                        let t = f.memory();
                        let grid = t
                            .product_keys()
                            .map_or((1, 0), |g| (g.sub_keys() as u64, g.key_floats()));
                        let (n, key_floats) = grid;
                        let kh = (f.k() as u64).min(n);
                        let macs = 2 * c * c + h * (n * dh + kh * kh * dh) + 2 * h * f.k() as u64 * dh;
                        let floats = t.len() * t.config().value_dim + key_floats;
                        ("product".to_string(), t.len(), floats, macs)
                    }
                    FeedForward::Featural(f) => {
                        let t = f.memory();
                        let searched = searched_rows(t.len(), t.parts());
                        let macs = 2 * c * c + h * searched * dh + 2 * h * f.k() as u64 * dh;
                        ("featural".to_string(), t.len(), t.len() * row_floats(t), macs)
                    }
                    FeedForward::Associative(a) => {
                        let t = a.memory();
                        let searched = searched_rows(t.len(), t.parts());
                        let macs = 3 * c * c + h * searched * dh + 2 * h * a.k() as u64 * dh;
                        ("associative".to_string(), t.len(), t.len() * row_floats(t), macs)
                    }
                    FeedForward::KeyValue(m) => {
                        // Every row's score (c + 1 products), then the k
                        // retrieved rows' scores and their values.
                        let t = m.memory();
                        let k = m.k() as u64;
                        let macs = t.len() as u64 * (c + 1) + k * (c + 1) + k * c;
                        ("keyvalue".to_string(), t.len(), t.len() * row_floats(t), macs)
                    }
                };
                LayerCost {
                    block,
                    kind,
                    weights,
                    memory_rows: rows,
                    memory_floats: floats,
                    macs_per_token: macs,
                }
            })
            .collect();
        let all = model.num_params();
        let embeddings = model.wte.weight.val().dims().iter().product::<usize>()
            + model.wpe.weight.val().dims().iter().product::<usize>();
        let (n_layer, vocab) = (config.n_layer as u64, config.vocab_size as u64);
        // q|k|v and output projections; scores and weighted sum over the
        // context (counted at the full context, an upper bound); LM head.
        let attention = n_layer * (4 * c * c + 2 * c * config.n_positions as u64);
        // Layerwise feedback: one projection into each block below the top
        // (the top one's is used only with an external signal).
        let feedback = model.feedback.as_ref().map_or(0, |_| n_layer.saturating_sub(1) * c * c);
        Accounting {
            all_weights: all,
            weights: all - embeddings,
            layers,
            shared_macs_per_token: attention + c * vocab + feedback,
        }
    }

    /// Floats of every memory table.
    pub fn memory_floats(&self) -> usize {
        self.layers.iter().map(|l| l.memory_floats).sum()
    }

    /// Non-embedding weights plus memory floats: what the model holds
    /// beside its embeddings at inference.
    pub fn weights_and_memory(&self) -> usize {
        self.weights + self.memory_floats()
    }

    /// Multiply-adds per token of the feed-forward layers.
    pub fn ff_macs_per_token(&self) -> u64 {
        self.layers.iter().map(|l| l.macs_per_token).sum()
    }
}

/// Rows one head's query is compared with: its partition's rows, or every
/// row of a shared table (in a partitioned table the rows are spread over
/// the heads; counted as an even share).
fn searched_rows(rows: usize, parts: usize) -> u64 {
    (rows as u64).div_ceil(parts.max(1) as u64)
}

fn row_floats(t: &crate::memory::tier::DeviceMemory) -> usize {
    t.config().key_dim + t.config().value_dim
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Gpt2Config;
    use burn::tensor::Device;

    /// A 2-block, 8-wide, 2-head GPT-2 over 10 tokens and 6 positions,
    /// counted by hand.
    #[test]
    fn dense_counts_match_a_hand_count() {
        let config = Gpt2Config::new(2, 8, 2, 6, 10);
        let model = Gpt2::init(&config, &Device::flex()).unwrap();
        let a = Accounting::of(&model);
        // Per block: ln_1 16 + c_attn 8·24 + 24 + c_proj 64 + 8 + ln_2 16 + c_fc 8·32 + 32 + c_proj 32·8 + 8.
        let mlp = 8 * 32 + 32 + 32 * 8 + 8;
        let block = 16 + (8 * 24 + 24) + (64 + 8) + 16 + mlp;
        assert_eq!(a.weights, 2 * block + 16);
        assert_eq!(a.all_weights, a.weights + 10 * 8 + 6 * 8);
        assert_eq!(a.layers.len(), 2);
        assert_eq!(a.layers[0].weights, mlp);
        assert_eq!(a.layers[0].kind, "mlp 32");
        assert_eq!(a.layers[0].macs_per_token, 2 * 8 * 32);
        assert_eq!(a.memory_floats(), 0);
        assert_eq!(a.shared_macs_per_token, 2 * (4 * 64 + 2 * 8 * 6) + 8 * 10);
    }

    /// The same model with a featural block (6 memories in 2 head tables,
    /// k 2) and an associative one (empty), counted by hand.
    #[test]
    fn memory_layers_count_their_tables_and_search() {
        use crate::memory::associative::AssociativeMemory;
        use crate::memory::featural::FeaturalMemory;
        use crate::memory::tier::DeviceMemory;
        use memstore_api::MemoryConfig;
        let device = Device::flex();
        let config = Gpt2Config::new(2, 8, 2, 6, 10);
        let dense = Accounting::of(&Gpt2::init(&config, &device).unwrap());
        let mut model = Gpt2::init(&config, &device).unwrap();
        let tier = |cap: usize| {
            DeviceMemory::new(MemoryConfig::new(4, 4), cap, &device)
                .unwrap()
                .with_parts(2)
                .unwrap()
        };
        let mut featural = tier(8);
        featural.fill(&[0.5; 6 * 4], &[0.25; 6 * 4], 0).unwrap();
        let f = FeaturalMemory::new(8, 2, 2, featural, &device).unwrap();
        let a = AssociativeMemory::new(8, 2, 2, tier(4), &device).unwrap();
        model.set_feed_forward(0, FeedForward::Featural(f)).unwrap();
        model.set_feed_forward(1, FeedForward::Associative(a)).unwrap();
        let m = Accounting::of(&model);
        // Featural: query and output projections (8·8 + 8 each) and log τ;
        // associative: query, key, value and output projections and the scale.
        let (fw, aw) = (2 * 72 + 1, 4 * 72 + 1);
        assert_eq!((m.layers[0].weights, m.layers[1].weights), (fw, aw));
        assert_eq!(m.weights, dense.weights - 2 * dense.layers[0].weights + fw + aw);
        assert_eq!((m.layers[0].memory_rows, m.layers[0].memory_floats), (6, 6 * 8));
        assert_eq!((m.layers[1].memory_rows, m.layers[1].memory_floats), (0, 0));
        assert_eq!(m.memory_floats(), 48);
        assert_eq!(m.weights_and_memory(), m.weights + 48);
        // Featural: 2 projections (2·64), 2 heads × 3 rows × 4 dims searched,
        // 2 heads × k 2 × 4 dims twice (distances, weighted sum).
        assert_eq!(m.layers[0].macs_per_token, 128 + 24 + 32);
        // Associative at inference: query, key and output projections; no rows.
        assert_eq!(m.layers[1].macs_per_token, 192 + 32);
        assert_eq!(m.ff_macs_per_token(), 184 + 224);
    }

    /// A key-value block (5 rows of 9-d keys and 8-d values, k 2) counted
    /// by hand: its output bias is its only weight.
    #[test]
    fn a_keyvalue_layer_counts_its_rows_and_scores() {
        use crate::config::Activation;
        use crate::memory::keyvalue::KeyValueMemory;
        use crate::memory::tier::DeviceMemory;
        use memstore_api::{MemoryConfig, Metric};
        let device = Device::flex();
        let config = Gpt2Config::new(1, 8, 2, 6, 10);
        let mut model = Gpt2::init(&config, &device).unwrap();
        let dense = Accounting::of(&model);
        let cfg = MemoryConfig::new(9, 8).with_metric(Metric::InnerProduct);
        let mut tier = DeviceMemory::new(cfg, 6, &device).unwrap();
        tier.fill(&[0.1; 5 * 9], &[0.2; 5 * 8], 0).unwrap();
        let kv = KeyValueMemory::new(8, 2, Activation::GeluTanh, tier, &device).unwrap();
        model.set_feed_forward(0, FeedForward::KeyValue(kv)).unwrap();
        let m = Accounting::of(&model);
        assert_eq!(m.layers[0].kind, "keyvalue");
        assert_eq!(m.layers[0].weights, 8);
        assert_eq!(m.weights, dense.weights - dense.layers[0].weights + 8);
        assert_eq!((m.layers[0].memory_rows, m.layers[0].memory_floats), (5, 5 * 17));
        // 5 scores of 9 products, then 2 retrieved scores and 2 values.
        assert_eq!(m.layers[0].macs_per_token, 5 * 9 + 2 * 9 + 2 * 8);
    }
}
