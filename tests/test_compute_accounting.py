"""Executed-compute accounting (chipmunk_jax.apps.compute) against hand counts on tiny configs."""

import numpy as np
import pytest

from chipmunk_jax.apps import compute as K
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.models.flux import FluxConfig
from chipmunk_jax.models.wan import WanConfig

# D = 16 (2 heads x 8), F = 64; N = 16 image + L = 4 text tokens, S = 20
FLUX = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2, in_channels=4,
                  joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
N, L, S, D, F = 16, 4, 20, 16, 64

ATTENTION = 2 * S * S * D * 2  # QK^T + PV = 25,600
DOUBLE_OTHER = (3 * 2 * N * D * D + 3 * 2 * L * D * D  # image + text QKV
                + 2 * N * D * D + 2 * L * D * D  # to_out, to_add_out
                + 2 * L * D * F * 2)  # the text MLP
DOUBLE_MLP = 2 * N * D * F * 2  # the image MLP
SINGLE_OTHER = 3 * 2 * S * D * D + 2 * S * D * D  # QKV + proj_out's attention half
SINGLE_MLP = 2 * S * D * F * 2  # proj_mlp + proj_out's MLP half
EMBED = 2 * N * 4 * D + 2 * L * 8 * D  # x_embedder + context_embedder
HEAD = 2 * N * D * 4
CONDITIONING = (2 * (256 * D + D * D) + 2 * (8 * D + D * D)  # timestep and pooled-text embedders
                + 2 * 2 * D * 6 * D + 2 * D * 3 * D + 2 * D * 2 * D)  # double, single, norm_out modulation


def _cost():
    return K.flux_cost(FLUX, num_image_tokens=N, num_text_tokens=L)


def test_flux_cost_matches_hand_count():
    cost = _cost()
    double, single = cost.layers
    assert (double.other, double.attention(), double.mlp()) == (DOUBLE_OTHER, ATTENTION, DOUBLE_MLP)
    assert (single.other, single.attention(), single.mlp()) == (SINGLE_OTHER, ATTENTION, SINGLE_MLP)
    assert (cost.embed, cost.probe_embed, cost.head, cost.conditioning) == (EMBED, 2 * N * 4 * D, HEAD, CONDITIONING)
    assert double.dense == 148_480 and cost.dense_call() == EMBED + 2 * 148_480 + HEAD
    assert cost.probe("modulated_input") == 2 * N * 4 * D
    assert cost.probe("first_block") == EMBED + 148_480
    with pytest.raises(ValueError, match="probe"):
        cost.probe("last_block")


def test_wan_cost_matches_hand_count():
    n, l, d, f = 16, 4, 16, 32
    model = WanConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                      text_dim=8, freq_dim=8, ffn_dim=f, num_layers=2)
    cost = K.wan_cost(model, num_video_tokens=n, num_text_tokens=l)
    block = cost.layers[0]
    other = (4 * 2 * n * d * d  # self-attention QKV + output
             + 2 * 2 * n * d * d + 2 * 2 * l * d * d  # cross-attention query + output, keys + values
             + 4 * n * l * d)  # cross-attention QK^T + PV
    assert len(cost.layers) == 2
    assert (block.other, block.attention(), block.mlp()) == (other, 4 * n * n * d, 2 * n * d * f * 2)
    assert cost.embed == 2 * n * 16 * d + 2 * l * 8 * d + 2 * l * d * d
    assert (cost.probe_embed, cost.head) == (2 * n * 16 * d, 2 * n * d * 16)
    assert cost.conditioning == 2 * 8 * d + 2 * d * d + 2 * d * 6 * d
    assert K.model_cost(model, num_tokens=n, num_text_tokens=l) == cost
    with pytest.raises(ValueError, match="image context"):
        K.wan_cost(WanConfig(image_dim=32), num_video_tokens=n, num_text_tokens=l)
    with pytest.raises(TypeError, match="no FLOP formula"):
        K.model_cost(object(), num_tokens=n, num_text_tokens=l)


def _chipmunk(**changes):
    # 4 steps; layer 0 (the double block) always dense, layer 1 (the single block) Chipmunk; full steps 0 and 2;
    # attention keeps tk = 5 of 20 keys, the MLP 16 of 64 features; one MLP row block of 20 tokens
    return ChipmunkConfig(num_steps=4).replace(
        attention__top_keys=0.25, attention__counts_multiple_of=1, attention__full_step_every=2,
        attention__first_n_dense_layers=1, attention__random_keys=0.0, attention__compress_indices=False,
        mlp__enabled=True, mlp__top_keys=0.25, mlp__random_keys=0.0, mlp__counts_multiple_of=8,
        mlp__full_step_every=2, mlp__first_n_dense_layers=1, mlp__block_size=64, **changes)


def test_chipmunk_schedule_hand_count():
    block_means = 2 * 1 * D * F
    # single block, steps 0-3: attention dense, dense + sparse refresh (x2), sparse; MLP dense / select alternating
    attention = ATTENTION + 2 * (ATTENTION + ATTENTION / 4) + ATTENTION / 4
    mlp = 2 * (SINGLE_MLP + block_means) + 2 * (SINGLE_MLP / 4 + block_means)
    dense_layer = DOUBLE_OTHER + ATTENTION + DOUBLE_MLP
    count = K.executed_flops(_cost(), 4, chipmunk=_chipmunk())
    assert count.parts["attention"] == 4 * ATTENTION + attention  # + the double block's dense attention
    assert count.parts["mlp"] == 4 * DOUBLE_MLP + mlp
    assert count.parts["linear"] == 4 * (DOUBLE_OTHER + SINGLE_OTHER)
    assert (count.parts["embed"], count.parts["head"], count.parts["probe"]) == (4 * EMBED, 4 * HEAD, 0)
    assert count.total == 4 * (EMBED + HEAD + CONDITIONING + dense_layer + SINGLE_OTHER) + attention + mlp
    dense = 4 * (CONDITIONING + EMBED + 2 * 148_480 + HEAD)
    assert count.dense == dense and count.fraction == pytest.approx(count.total / dense)
    assert count.computed_steps == 4 and count.fraction < 1


def test_static_step_cache_runs_only_the_head():
    full = K.executed_flops(_cost(), 4, chipmunk=_chipmunk())
    skip = K.executed_flops(_cost(), 4,
                            chipmunk=_chipmunk(step_cache__enabled=True, step_cache__skip_step_schedule=(3,)))
    step3 = EMBED + DOUBLE_OTHER + ATTENTION + DOUBLE_MLP + SINGLE_OTHER + ATTENTION / 4 + SINGLE_MLP / 4 + 2 * D * F
    assert skip.computed_steps == 3 and skip.total == full.total - step3


def test_policy_counts_the_probe_on_every_step_and_the_cfg_branches():
    computed = np.array([True, False, True, False])
    count = K.executed_flops(_cost(), 4, computed=computed, probe="first_block")
    call = EMBED + 2 * 148_480 + HEAD
    assert count.parts["probe"] == 4 * (EMBED + 148_480)
    assert count.total == 2 * call + 2 * HEAD + 4 * CONDITIONING + 4 * (EMBED + 148_480)
    cheap = K.executed_flops(_cost(), 4, computed=computed, probe="modulated_input")
    assert cheap.total == count.total - 4 * (EMBED + 148_480) + 4 * 2 * N * 4 * D
    cfg = K.executed_flops(_cost(), 4, computed=computed, probe="first_block", branches=2)
    assert cfg.total == 2 * count.total and cfg.fraction == pytest.approx(count.fraction)
    dense = K.executed_flops(_cost(), 4)
    assert dense.total == dense.dense and dense.fraction == 1.0


def test_policy_composes_with_chipmunk():
    computed = np.array([True, True, False, True])
    with_policy = K.executed_flops(_cost(), 4, chipmunk=_chipmunk(), computed=computed, probe="modulated_input")
    # step 2 skipped: its Chipmunk work (a full step) is not run
    step2 = EMBED + DOUBLE_OTHER + ATTENTION + DOUBLE_MLP + SINGLE_OTHER + 1.25 * ATTENTION + SINGLE_MLP + 2 * D * F
    assert with_policy.total == K.executed_flops(_cost(), 4, chipmunk=_chipmunk()).total - step2 + 4 * 2 * N * 4 * D


def test_keep_shares():
    config = ChipmunkConfig().replace(attention__top_keys=0.1, attention__counts_multiple_of=16,
                                      attention__dynamic_random_keys=0.01, attention__compress_indices=True)
    assert K.attention_keep_share(config.attention, 1024) == pytest.approx(96 / 1024 + 0.01)  # 16 * round(6.4)
    assert K.attention_keep_share(config.attention, 1024, static_keys=0.9) == 1.0
    plain = config.replace(attention__compress_indices=False)
    assert K.attention_keep_share(plain.attention, 1024) == pytest.approx(96 / 1024)
    mlp = ChipmunkConfig().replace(mlp__top_keys=0.3, mlp__counts_multiple_of=8, mlp__random_keys=0.05).mlp
    assert K.mlp_keep_share(mlp, 512) == pytest.approx(160 / 512 + 0.05)  # 154 features rounded up to 160


def test_bad_arguments():
    cost = _cost()
    with pytest.raises(ValueError, match="both computed"):
        K.executed_flops(cost, 4, computed=np.ones(4, bool))
    with pytest.raises(ValueError, match="bool mask"):
        K.executed_flops(cost, 4, computed=np.ones(3, bool), probe="first_block")
    with pytest.raises(ValueError, match="static step cache"):
        K.executed_flops(cost, 4, chipmunk=_chipmunk(step_cache__enabled=True), computed=np.ones(4, bool),
                         probe="first_block")
    with pytest.raises(ValueError, match="exceed"):
        K.executed_flops(cost, 5, chipmunk=_chipmunk())
    with pytest.raises(TypeError, match="ChipmunkConfig"):
        K.executed_flops(cost, 4, chipmunk={"attention": {}})
