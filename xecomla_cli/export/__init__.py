"""Export a stage checkpoint as a Hugging Face model in the DeepSeek-V3 layout (or our own format).

Stock transformers (no remote code) and the serving engines load ``model_type: deepseek_v3``.
Our MLA maps onto it exactly, per layer (H heads, head dim h = n + p, latent rank r):

    ours                                   DeepSeek-V3
    q_proj [nope n | rope p] per head      q_proj, RoPE rows permuted to interleaved pairs
    kv_a_proj_with_mqa [c r | k_rope p]    kv_a_proj_with_mqa, k_rope rows permuted likewise
    kv_a_layernorm (optional)              kv_a_layernorm (mandatory)
    kv_b_proj [k_nope n | v h] per head    kv_b_proj (qk_nope_head_dim n, v_head_dim h)
    o_proj                                 o_proj
    rope_inv_freq (per layer, p/2)         rope_parameters of the base model at dim p

RoPE: ours pairs dim j with j + p/2 (rotate-half); DeepSeek-V3 (``rope_interleave: true``, the
layout vLLM and SGLang assume) pairs 2i with 2i+1 and returns the rotated pairs in rotate-half
order. Permuting the RoPE rows of q and k_rope by [0, p/2, 1, p/2+1, …] makes its rotated q and k
equal ours bit for bit, and its cached ``k_rot`` identical to ours.

The latent norm. DeepSeek-V3 always applies ``kv_a_layernorm`` (and ``q_a_layernorm`` with
``q_lora_rank``); the paper's MLA has none. Two exact mappings:

* ``norm``: the checkpoint has a latent norm (init-svd's default, trained by distill):
  weights map one to one; no biases, so every engine loads it.
* ``identity`` (the constant channel; ``init-svd --no-latent-norm``): one extra latent channel with
  zero weights and a bias C (``attention_bias: true``). With C² ≥ 2^26 · max‖c‖², fp32 computes mean(c_ext²) = C²/(r+1)
  exactly, so RMSNorm(c_ext) = c · s with a constant s, and the norm weight 1/s undoes it (the
  extra channel's weight is 0, so it is cached as 0 and its up-projection column is 0). Exact to
  ~1 ulp; costs one cached value per token per layer (r + 1 + p). C is a power of two times a
  mantissa chosen so that fl(1/s)·s is 1 to within ~1e-5 even in bf16.

Anything else is refused with a line saying why (hybrid layers, query/up-projection biases,
per-layer ranks without --pad-ranks, RoPE frequencies the config cannot express); ``--format
xecomla`` writes our own format instead.

The package, in the order an export runs:

    model_view                what an export reads: a checkpoint on disk (one layer at a time) or a model in memory
    records.ExportPlan        every choice an export makes (and ExportResult, what it produced)
    plan.plan_export          the ExportPlan: every choice, or one line saying why not
    rope.rope_choice          the RoPE frequencies DeepSeek-V3's rotary embedding must reproduce
    config.deepseek_config    config.json
    weights                   the weights in the DeepSeek-V3 layout (one layer at a time), the emulation constants
    shards                    safetensors shards written tensor by tensor, each header first
    verify.verify_export      stock transformers must reproduce our logits before the rename
    write.export_checkpoint   the atomic write (plus card.render_card, the README.md)
    hub.push_to_hub           the upload

``--format gguf`` (llama.cpp; gguf_export.py says what it refuses and why):

    gguf_export.export_gguf   deepseek2 for an MLA checkpoint, llama for an original; temp file, verify, rename
    gguf_tensors              the tensors and keys of each llama.cpp arch (from the DeepSeek-V3 state dict)
    gguf_tokenizer            tokenizer metadata that llama.cpp tokenises exactly like transformers
    gguf_writer               the file (gguf.GGUFWriter) in f32 / f16 / bf16 / q8_0
    gguf_verify               tokens, logits and greedy tokens in llama.cpp (gguf_llama_run.py: the child process)
    llama_cpp_build           where `make setup` put llama.cpp (libraries, llama-bench, llama-completion)
"""

from .hub import push_to_hub
from .plan import plan_export
from .records import ExportPlan, ExportResult
from .write import export_checkpoint

__all__ = ["ExportPlan", "ExportResult", "export_checkpoint", "plan_export", "push_to_hub"]
