//! The whole-model case: the small Llama of [`check_model_config`] on one ragged packed batch.

use rand::Rng;

use super::harness::{ragged_lengths, CaseError, Io};
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::data::{Document, TokenStore};
use crate::model::{DeviceBatch, Llama, ParamLayout};
use crate::packing::PackedBatch;

/// The small model of the whole-model case.
pub fn check_model_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 1000,
        d_model: 256,
        n_layers: 2,
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 32,
        ffn_dim: 688,
        tie_embeddings: false,
        // Larger than the usual 0.02 so attention is not nearly uniform.
        init_std: 0.05,
        ..ModelConfig::default()
    }
}

/// Which outputs the whole-model case checks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ModelOutputs {
    /// The loss and per-token losses of the forward.
    Forward,
    /// Those and every parameter gradient of one backward, in f32.
    Grads,
    /// The same with the layers' weight gradients in the backend's activation precision
    /// (`Llama::with_act_grads`, what `train.bf16_grads` runs).
    ActGrads,
}

/// The small Llama on one packed batch of ~20 ragged documents (T ~ 3000, one document of
/// length 1, one with its first half masked out of the loss): loss, per-token losses and
/// (unless `Forward`) every parameter gradient.
pub(super) fn model_case<B: Backend>(
    io: &mut Io<B>,
    outputs: ModelOutputs,
) -> Result<(), CaseError> {
    let grads = outputs != ModelOutputs::Forward;
    let cfg = check_model_config();
    let lens = ragged_lengths(&mut io.rng, 20, 3000, false);
    let docs: Vec<Document> = lens
        .iter()
        .enumerate()
        .map(|(k, &l)| {
            let tokens: Vec<u32> = (0..l)
                .map(|_| io.rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            // Document 2: a "prompt" half that is not in the loss.
            let labels = (k == 2).then(|| (0..l).map(|i| i >= l / 2).collect());
            Document { tokens, labels }
        })
        .collect();
    let store = TokenStore::from_documents(&docs);
    let bin: Vec<u32> = (0..docs.len() as u32).collect();
    let packed = PackedBatch::assemble(&bin, &store)
        .map_err(|e| CaseError::Check(format!("assemble: {e}")))?;
    let t = packed.num_tokens();

    let layout = ParamLayout::new(&cfg);
    let weights = layout.init(&cfg, io.rng.random());
    // Capacity above T: the model's buffers are longer than the batch.
    let mut model = Llama::new(io.be, &cfg, &weights, t + 37, false)?;
    if outputs == ModelOutputs::ActGrads {
        model = model.with_act_grads(io.be)?;
    }
    let mut batch = DeviceBatch::new(io.be, t + 37)?;
    batch.upload(io.be, &packed)?;
    let loss = if grads {
        model.zero_grads(io.be)?;
        model.forward_backward(io.be, &batch, 1.0 / packed.num_targets.max(1) as f32)?
    } else {
        model.forward(io.be, &batch)?
    };
    io.output_host("loss_sum", vec![loss as f32]);
    io.output_host("token_losses", model.token_losses(io.be, t)?);
    if grads {
        for (spec, g) in layout.specs.iter().zip(model.grads_to_host(io.be)?) {
            io.output_host(&format!("d {}", spec.name), g);
        }
    }
    Ok(())
}
