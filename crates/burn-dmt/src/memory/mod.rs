//! Memory layers' building blocks. The device tier keeps a layer's working
//! set of memories as device tensors and answers exact top-k with one matrix
//! product and a top-k on the device, as product-key memories (Lample et al.
//! 2019), Memory Layers at Scale (Berges et al. 2024) and PEER (He 2024) do:
//! a database round trip per token cannot keep an accelerator busy, so the
//! durable memstore is synchronised in the background instead.
//!
//! The pieces: the exact device top-k ([`device`]); the device tier
//! ([`tier`]), which loads from a store, records LRFU accesses, sparse value
//! updates, novelty inserts and evictions as change batches; the write-behind
//! thread, with or without a journal, that brings those batches to the store
//! ([`journal`]);
//! the featural ([`featural`]), associative ([`associative`]) and key-value
//! ([`keyvalue`]: a feed-forward layer's own units as rows) layers; and
//! the per-block plan ([`layers`]); product keys, a table whose keys are
//! a grid's cells, searched in `O(√rows)` per query ([`product`]); the
//! output memory at the LM head, a kNN-LM datastore whose rows vote for
//! next tokens ([`output`]); reading a step's device tensors back
//! in one transfer ([`readback`]); retrieval traces for inspection
//! ([`trace`]). Novelty insertion and recombination of
//! near-duplicates happen on the device tier, with the store's arithmetic
//! ([`memstore_api::math`]), and reach the store as change batches.

pub mod associative;
pub mod device;
pub mod featural;
pub mod journal;
pub mod keyvalue;
pub mod layers;
pub mod output;
pub mod product;
pub mod readback;
pub mod tier;
pub mod trace;
