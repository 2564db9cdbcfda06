"""vpmoe-compile: turn a stock Megatron-Core GPT model into the vpMoE architecture.

    model = megatron_base.build_stock_gpt("vpmoe-8l")      # or your own stock GPTModel
    model = vpmoe_compile.transform(model, dump_dir="dump") # TPA + GRAPE + sink kernels
    optimizer = vpmoe_compile.build_optimizer(model)        # NorMuon + Polar Express (+ AdamW)
    vpmoe_compile.compile(model)                            # each layer one torch.compile graph
    vpmoe_compile.save_checkpoint("ckpt/iter_0000100", model, optimizer, iteration=100)
    vpmoe_compile.load_checkpoint("ckpt/iter_0000100", build_stock_gpt("vpmoe-8l"))  # replays the transform

The kernels (``vpmoe_compile.ops``) and the optimizer (``vpmoe_compile.optim``) import without
Megatron; ``transform``, ``compile`` and ``build_optimizer`` are imported lazily.
"""

__version__ = "0.1.0"

__all__ = [
    "transform", "compile", "build_optimizer", "register_pass", "TransformError", "__version__",
    "transform_state", "restore", "save_checkpoint", "load_checkpoint", "read_transform_state",
]

_CHECKPOINT = ("transform_state", "restore", "save_checkpoint", "load_checkpoint", "read_transform_state",
               "CheckpointError")


def __getattr__(name):
    if name in ("transform", "TransformError"):
        from vpmoe_compile import pipeline as _t

        return getattr(_t, name)
    if name in _CHECKPOINT:
        from vpmoe_compile import checkpoint as _c

        return getattr(_c, name)
    if name == "register_pass":
        from passes.registry import register_pass

        return register_pass
    if name == "compile":
        from vpmoe_compile.compiler import compile as _compile

        return _compile
    if name == "build_optimizer":
        from vpmoe_compile.optim import build_optimizer

        return build_optimizer
    raise AttributeError(f"module 'vpmoe_compile' has no attribute {name!r}")
