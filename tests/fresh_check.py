"""Run in a fresh process by the tests: the same tiny-flux pipeline call, eager vs the artifact.

Prints one JSON line: max |diff| of the final latents against eager with the same scheme (compile
fidelity), against eager unquantized (quantization error), and resident memory figures.
"""

import json
import sys

import psutil
import torch


def main(artifact: str, scheme: str) -> None:
    rss0 = psutil.Process().memory_info().rss
    import aotpack
    from aotpack.models import load_pipeline
    from aotpack.recipe import get_recipe
    from aotpack.run import source_of
    from aotpack.schemes import get_scheme, quantize, torchao_config

    data = aotpack.inspect(artifact)
    recipe = get_recipe("tiny-flux")
    pipe = load_pipeline(recipe, source_of(data), dtype="float32")

    def call():
        return pipe("a dog surfing on the moon", height=96, width=64, num_inference_steps=3,
                    max_sequence_length=32, num_images_per_prompt=1, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).images

    with torch.no_grad():
        eager_fp = call()
        config = torchao_config(get_scheme(scheme))
        if config is not None:
            quantize(pipe.transformer, get_scheme(scheme), config)
        eager_q = call()
        rss1 = psutil.Process().memory_info().rss
        aotpack.load_into(pipe, artifact)
        rss2 = psutil.Process().memory_info().rss
        assert type(pipe.transformer).__name__ == "AotModule"
        aot = call()
    print(json.dumps({
        "vs_eager_same_scheme": float((aot - eager_q).abs().max()),
        "vs_eager_unquantized": float((aot - eager_fp).abs().max()),
        "scale": float(eager_fp.abs().max()),
        "rss_load_delta": rss2 - rss1,
        "rss_start": rss0,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
