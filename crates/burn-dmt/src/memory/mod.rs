//! Memory layers' building blocks. The device tier keeps a layer's working
//! set of memories as device tensors and answers exact top-k with one matrix
//! product and a top-k on the device, as product-key memories (Lample et al.
//! 2019), Memory Layers at Scale (Berges et al. 2024) and PEER (He 2024) do:
//! a database round trip per token cannot keep an accelerator busy, so the
//! durable memstore is synchronised in the background instead.
//!
//! So far: the exact device top-k ([`device`]), a device tier loaded from a
//! store ([`tier`]), the featural layer ([`featural`]) and the per-block plan
//! ([`layers`]). Still to come (the memory-layer issue): the associative layer,
//! device-side insertion and recombination, and the write-behind journal that
//! keeps the store in sync.

pub mod device;
pub mod featural;
pub mod journal;
pub mod layers;
pub mod tier;
