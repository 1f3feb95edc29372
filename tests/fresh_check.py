"""The same pipeline call, eager diffusers vs the artifact: run as a script by the tests that need a fresh
process (test_end_to_end), called in-process (``compare``) by the others.

    python tests/fresh_check.py ARTIFACT SCHEME [--lora FILE --lora-scale S] [--swap]

The eager side is what a diffusers user would write: from_pretrained, then (with --lora) load_lora_weights +
fuse_lora, then the build options the manifest records (fused projections, quantized text encoders), then
torchao quantization. The artifact side is ``aotpack.load_into`` (``--swap``: the LoRA is swapped into the
compiled module at load time instead of being in the build).

Prints one JSON line: max |diff| of the final latents against eager with the same scheme (compile fidelity),
against eager unquantized (quantization error), against eager without the LoRA, and memory figures.
"""

import argparse
import json

import psutil
import torch


def compare(argv: list[str]) -> dict:
    """The comparison, in this process (the tests that must start fresh run this file as a script)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("scheme")
    ap.add_argument("--lora")
    ap.add_argument("--lora-scale", type=float, default=1.0)
    ap.add_argument("--swap", action="store_true")
    ap.add_argument("--decode", action="store_true", help="compare decoded images, not latents")
    args = ap.parse_args(argv)
    rss0 = psutil.Process().memory_info().rss
    import aotpack
    import aotpack.serve.module as aotpack_module
    from aotpack.builder.source import load_pipeline
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.source import source_of
    from aotpack.builder.schemes import get_scheme, quantize, torchao_config

    manifest = aotpack.inspect(args.artifact)
    recipe = get_recipe(manifest.recipe.name, manifest.recipe.variant)
    options = manifest.options
    pipe = load_pipeline(recipe, source_of(manifest.model), dtype=manifest.dtype)

    def call():
        # not the capture's size: the artifact serves other sizes (and frames) than it was exported with
        kwargs = recipe.pipeline_kwargs(height=96, width=64, steps=3, guidance_scale=recipe.run["guidance_scale"],
                                        frames=13 if recipe.is_video else None)
        out = pipe("a dog surfing on the moon", **kwargs, output_type="pt" if args.decode else "latent",
                   generator=torch.Generator().manual_seed(1))
        return out.frames if recipe.is_video else out.images

    def quantize_all(scheme_name, targets):
        scheme = get_scheme(scheme_name)
        config = torchao_config(scheme)
        if config is not None:
            for t in targets:
                quantize(t, scheme, torchao_config(scheme))

    with torch.no_grad():
        eager_fp = call()
        if options.quantize_text_encoder:
            quantize_all(options.quantize_text_encoder,
                         [getattr(pipe, n) for n in pipe.components if n.startswith("text_encoder")])
        if args.lora:
            eager_base = call()
            pipe.load_lora_weights(args.lora)
            pipe.fuse_lora(lora_scale=args.lora_scale)
            pipe.unload_lora_weights()
        if options.fuse_qkv:
            pipe.transformer.fuse_qkv_projections()
        if options.regional:  # a regional build quantizes its blocks; the parts around them stay as they are
            from aotpack.builder.regional import instances

            classes = sorted({m.block_class for m in manifest.modules if m.kind == "block"})
            quantize_all(args.scheme, [pipe.transformer.get_submodule(p)
                                       for paths in instances(pipe.transformer, classes).values() for p in paths])
            from aotpack.serve.glue import pack

            pack(pipe.transformer, list(manifest.glue_int8))  # and the linears it gave int8 weights
        else:
            quantize_all(args.scheme, [pipe.transformer])
        eager_q = call()
        if not args.lora:
            eager_base = eager_q
        rss1 = psutil.Process().memory_info().rss
        swap = {"lora": args.lora, "lora_scale": args.lora_scale} if args.swap else {}
        pipe = aotpack.load_into(pipe, args.artifact, **swap)
        rss2 = psutil.Process().memory_info().rss
        real = manifest.model.config["_class_name"]
        expected = real if options.regional else f"Aot{real}"  # whole graph: AotModule standing in for the class
        assert type(pipe.transformer).__name__ == expected, type(pipe.transformer)
        assert options.regional or isinstance(pipe.transformer, aotpack_module.AotModule)
        if options.compile_vae:
            assert type(pipe.vae).__name__ == "AotVaeDecoder"
        aot = call()
    return {
        "vs_eager_same_scheme": float((aot - eager_q).abs().max()),
        "vs_eager_unquantized": float((aot - eager_fp).abs().max()),
        "vs_eager_without_lora": float((aot - eager_base).abs().max()),
        "scale": float(eager_fp.abs().max()),
        "shape": list(aot.shape),
        "rss_load_delta": rss2 - rss1,
        "rss_start": rss0,
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(compare(sys.argv[1:])))
