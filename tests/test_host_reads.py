"""On an accelerator a reduction must read nothing from the device on the host while the layers run: each read
waits for all the work queued before it, so the host stops running ahead and the GPU idles between kernels
(docs/bench.md, "GPU run": the first H200 profile counted 60 such reads in FiCoCo-V's prefill).

Checked on the CPU: every step is put on its accelerator code path (`paradigm.attention.on_host` answers
False, so no CPU-only shortcut that reads is taken) and every torch call that would read is recorded
(helpers_tiny.HostReads) while a vision or decoder layer runs, in the second prefill of the tiny
LLaVA-1.5-shaped model (the first fills the caches of host-side arithmetic). Every registered method: none,
but the released FiCoCo-V code's port, whose merge count is the data's.
"""
import pytest
import torch

import ficoco
from ficoco import methods
from ficoco.bench import bench_configs, text_towers
from ficoco.dims import ModelDims
from ficoco.gpu_bench import overrides_for
from ficoco.measure import synthetic_inputs
from ficoco.methods.ficoco_v_code import code_targets
from ficoco.paradigm import attention, compress, correlate, filter
from helpers_tiny import HostReads, bench_shaped_model

VARIANTS = [("ficoco-l", {"placement": "attention", "start": 1, "window": 1}),
            ("ficoco-l", {"start": 1, "window": 2})]
FITTED = [("fitprune", {"deletions": [300, 150, 50, 0]})]      # attention sees 576, 276, 126, 76: B = 264


@pytest.fixture(scope="module")
def model():
    return bench_shaped_model()


def layer_reads(model, inputs, config) -> list[str]:
    """The reads while a vision or decoder layer of `model` runs, in the second prefill under `config`."""
    depth = []                                          # the layers running now

    def enter(*_):
        depth.append(1)

    def leave(*_):                                      # returns None: the layer's output stays
        depth.pop()

    layers = list(model.model.vision_tower.encoder.layers) + list(model.model.language_model.layers)
    hooks = [hook for layer in layers for hook in (layer.register_forward_pre_hook(enter, prepend=True),   # first
                                                   layer.register_forward_hook(leave, always_call=True))]
    method, budget, overrides = config
    try:
        tower = text_towers(model, [config])(method)
        with ficoco.apply(model, method, budget, text_tower=tower, **overrides), torch.inference_mode():
            model(**inputs, logits_to_keep=1)
            with HostReads(active=lambda: bool(depth)) as reads:
                model(**inputs, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return reads.reads


def accelerator_paths(monkeypatch):
    for module in (attention, filter, compress, correlate):
        monkeypatch.setattr(module, "on_host", lambda tensor: False)


def test_no_method_reads_the_device_while_the_layers_run(model, monkeypatch):
    accelerator_paths(monkeypatch)
    inputs = synthetic_inputs(model, 2, 60, 0)            # two rows, two images
    dims = ModelDims.from_config(model.config)
    configs, _ = bench_configs(methods.names(), [192, 64], dims, variants=VARIANTS, overrides=overrides_for("tiny"))
    released, _ = bench_configs(["ficoco-v-code"], [384], dims, overrides=overrides_for("tiny"))   # 2r <= T
    fitted, _ = bench_configs([], [264], dims, variants=FITTED, overrides=overrides_for("tiny"))
    configs += released[1:] + fitted[1:]
    reading = {method: reads for method, budget, overrides in configs
               if (reads := layer_reads(model, inputs, (method, budget, overrides)))}
    # but the released code's port: how many targets each source merges into (its K) is the data's, one count
    # read in each reducing layer, as the authors' code reads it (FiCoCo_V.py)
    line = code_targets.__code__.co_firstlineno
    assert reading == {"ficoco-v-code": [f"__int__ at ficoco_v_code.py:{line + 13}"]}
    assert {method for method, _, _ in configs} == set(methods.names()) | {"vanilla"}


def test_the_check_sees_a_read_inside_a_layer(model):
    """Left on the CPU, FiCoCo-V's merge takes its host shortcut (`nonzero` over the merge weights), inside the
    reducing CLIP layer."""
    inputs = synthetic_inputs(model, 1, 60, 0)
    config, = bench_configs(["ficoco-v"], [64], ModelDims.from_config(model.config),
                            overrides=overrides_for("tiny"))[0][1:]
    assert [read.split(" at ")[0] for read in layer_reads(model, inputs, config)] == ["__bool__", "nonzero"]
