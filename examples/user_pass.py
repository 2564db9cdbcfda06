"""Your own pass: one class, one registration, and ``transform`` runs it like the library's.

A pass rewrites the module tree of a stock Megatron ``GPTModel``. It declares what it needs
(``requires``: passes that must have run; ``after``: soft order), which module classes it may
install (``installs``: the manager refuses anything else), and whether the default pipeline runs
it for a config (``enabled``). ``check`` runs for every pass before any pass changes the model;
``run`` performs the rewrite and fills the ``PassResult`` the debug dump shows. If anything
fails, the whole transform is rolled back. A checkpoint records the pass by name: register it
before ``load_checkpoint`` replays the transform on a fresh stock model.

This example pass gives every *local* (sliding-window) layer's input norm a larger epsilon,
taking the layers from the layer plan (``ctx.plan``) rather than re-deriving them::

    python examples/user_pass.py --dump-dir /tmp/user_pass_dump
"""

import argparse
import tempfile

import torch

import vpmoe_compile
from megatron_base import build_stock_gpt, init_process, load_config
from passes.base import Pass, PassError


@vpmoe_compile.register_pass
class LocalNormEpsPass(Pass):
    name = "local_norm_eps"
    requires = ("layer_plan",)  # sites come from the layer plan
    after = ("grape",)  # run after GRAPE when both are in the pipeline
    installs = ("RMSNorm",)  # torch.nn.RMSNorm is the only class this pass puts in the tree
    eps = 1e-4

    @classmethod
    def enabled(cls, cfg):  # part of the default pipeline for every config
        return True

    def sites(self, ctx):
        return [f"decoder.layers.{layer.index}.input_layernorm" for layer in ctx.plan.layers if layer.is_local]

    def check(self, ctx):
        if not self.sites(ctx):
            raise PassError("local_norm_eps: the model has no local (sliding-window) layer")

    def run(self, ctx, result):
        for path in self.sites(ctx):
            old = ctx.model.get_submodule(path)
            new = torch.nn.RMSNorm(old.weight.shape[0], eps=self.eps, device=old.weight.device,
                                   dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(old.weight)
            self.replace_module(ctx.model, path, new, result)
            result.sites.append(path)
        result.summary = f"{len(result.sites)} local-layer input norms with eps {self.eps:g}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="config preset or TOML path (default: tiny)")
    p.add_argument("--dump-dir", default=None, help="write the debug dump here (default: none)")
    args = p.parse_args()
    init_process()
    cfg = load_config(args.config)
    model = build_stock_gpt(cfg, device="cpu")
    vpmoe_compile.transform(model, cfg, dump_dir=args.dump_dir)  # the default pipeline now includes it
    print(model.vpmoe_transform.summary())
    with tempfile.TemporaryDirectory() as d:
        vpmoe_compile.save_checkpoint(f"{d}/ck", model)
        fresh = build_stock_gpt(cfg, device="cpu")
        vpmoe_compile.load_checkpoint(f"{d}/ck", fresh)  # replays the pipeline, this pass included
        print("restored passes:", ", ".join(fresh.vpmoe_transform.passes))


if __name__ == "__main__":
    main()
