import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memory_distill import DistillConfig, RewardBins, TeacherConfig, build_student, build_teacher
from memory_distill.losses import distillation_loss, kd_kl, soft_cross_entropy
from memory_distill.models import RewardMLP, compression_ratio, param_count


def test_kd_kl_closed_form_two_bins():
    # teacher logits [0, log 3] -> p = (1/4, 3/4); student uniform -> q = (1/2, 1/2); T = 1
    t = torch.tensor([[0.0, math.log(3.0)]])
    s = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kd_kl(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_kl_scales_by_T_squared():
    t = torch.tensor([[0.0, 2 * math.log(3.0)]])  # at T=2 -> logits [0, log 3]
    s = torch.zeros(1, 2)
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) * 4.0
    assert kd_kl(s, t, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_kl_zero_for_identical_and_nonnegative():
    x = torch.randn(8, 64)
    assert kd_kl(x, x, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert (kd_kl(torch.randn(8, 64), x, 4.0, reduction="none") >= -1e-6).all()


@pytest.mark.parametrize("fn", ["kl", "ce", "distill"])
def test_one_row_equals_32_copies(fn):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    y = torch.softmax(torch.randn(1, 64, generator=g), -1)

    def loss(s, t, y):
        if fn == "kl":
            return kd_kl(s, t, 4.0)
        if fn == "ce":
            return soft_cross_entropy(s, y)
        return distillation_loss(s, t, y, temperature=4.0, alpha=0.7, beta=0.3)

    one = loss(s, t, y)
    many = loss(s.repeat(32, 1), t.repeat(32, 1), y.repeat(32, 1))
    assert one.item() == pytest.approx(many.item(), rel=1e-6)


def test_soft_ce_equals_nll_for_one_hot():
    logits, idx = torch.randn(5, 10), torch.tensor([0, 3, 9, 2, 2])
    assert soft_cross_entropy(logits, F.one_hot(idx, 10).float()).item() == pytest.approx(
        F.cross_entropy(logits, idx).item(), rel=1e-6)


def test_distillation_loss_is_alpha_kl_plus_beta_ce_with_label_mask():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    y = torch.softmax(torch.randn(4, 8, generator=g), -1)
    lab = torch.tensor([True, False, True, False])
    got = distillation_loss(s, t, y, temperature=3.0, alpha=0.7, beta=0.3, labeled=lab, reduction="none")
    kl = kd_kl(s, t, 3.0, reduction="none")
    ce = soft_cross_entropy(s, y, reduction="none")
    torch.testing.assert_close(got, 0.7 * kl + 0.3 * ce * lab.float())
    w = torch.tensor([1.0, 2.0, 0.5, 0.0])
    torch.testing.assert_close(
        distillation_loss(s, t, y, temperature=3.0, alpha=0.7, beta=0.3, labeled=lab, weights=w),
        (got * w).mean())


def test_bins_geometry_and_targets():
    b = RewardBins(0.0, 1.0, 64)
    assert b.centers.shape == (64,) and b.width == pytest.approx(1 / 64)
    assert b.to_index(np.array([0.0, 0.999, 1.0, -5, 5])).tolist() == [0, 63, 63, 0, 63]
    h = b.hard_targets(np.array([0.5]))
    assert h.sum() == 1 and h[0, 32] == 1
    r = np.array([0.2, 0.5, 0.77])
    t = b.hl_gauss_targets(r)
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(t @ b.centers, r, atol=2e-3)  # smoothed, but centred on the reward
    # sigma 0.75 bin widths: most mass within +-1 bin
    assert (t[:, :] * (np.abs(np.arange(64) - b.to_index(r)[:, None]) <= 1)).sum(1).min() > 0.7


def test_bins_fit_with_margin_and_roundtrip():
    b = RewardBins.fit(np.array([2.0, 4.0, 6.0, np.nan]))
    assert b.low == pytest.approx(1.8) and b.high == pytest.approx(6.2)
    assert RewardBins.from_dict(b.to_dict()) == b
    with pytest.raises(ValueError, match="without rewards"):
        RewardBins.fit(np.array([np.nan]))


def test_bins_and_model_builders_check_their_arguments():
    """RewardBins(0, 1, 2.5) was built and failed in linspace, a negative sigma_ratio made every soft target NaN;
    build_teacher({...}) failed as "'dict' object has no attribute 'hidden'"."""
    for kw, why in (({"n_bins": 2.5}, "n_bins must be a whole number >= 2"),
                    ({"n_bins": "8"}, "n_bins must be a whole number >= 2"),
                    ({"sigma_ratio": -1.0}, "sigma_ratio must be a number > 0"),
                    ({"sigma_ratio": float("nan")}, "sigma_ratio must be a number > 0"),
                    ({"low": "0"}, "bins need finite low < high")):
        with pytest.raises(ValueError, match=why):
            RewardBins(**{"low": 0.0, "high": 1.0, **kw})
    assert RewardBins(np.float32(0), np.float64(1), np.int64(8)).n_bins == 8
    assert not np.isnan(RewardBins(0.0, 1.0, 8).targets(np.array([0.5]))).any()
    t = build_teacher({"hidden": [8]}, 16, 4)
    assert t.arch()["hidden"] == [8] and build_student({"hidden": [4]}, 16, 4).arch()["hidden"] == [4]
    with pytest.raises(ValueError, match="did you mean 'hidden'"):
        build_student({"hiden": [4]}, 16, 4)


def test_summary_of_a_point_mass():
    b = RewardBins(0.0, 1.0, 10)
    logits = torch.full((1, 10), -1e9)
    logits[0, 7] = 0
    s = b.summarize(logits)
    assert s["mean"][0] == pytest.approx(0.75) and s["std"][0] == pytest.approx(0, abs=1e-3)
    assert s["entropy"][0] == pytest.approx(0, abs=1e-4) and s["quantiles"][0.5][0] == pytest.approx(0.75)


def test_calibration_reads_the_pit_at_bin_resolution():
    from memory_distill.evaluate import model_metrics, pit_coverage
    from memory_distill.rewards import QUANTILES

    bins = RewardBins(0.0, 1.0, 64)
    rng = np.random.default_rng(0)
    r = rng.random(5000)
    # all mass on each reward's own bin: calibrated at bin resolution wherever in its bin the reward falls
    # (the bin-centre quantiles read half the rewards as above every quantile: error 0.26)
    exact = bins.hard_targets(r)
    np.testing.assert_allclose(pit_coverage(exact, r, bins), QUANTILES, atol=1e-12)
    assert model_metrics(exact, r, bins).calibration_error < 1e-9
    # pass/fail rewards forecast with the true pass rate: calibrated (the bin-centre reading said 0.30)
    passed = (rng.random(20_000) < 0.3).astype(np.float64)
    honest = np.zeros((len(passed), 64))
    honest[:, 0], honest[:, 63] = 0.7, 0.3
    assert model_metrics(honest, passed, bins).calibration_error < 0.02
    sure = np.zeros_like(honest)
    sure[:, 0], sure[:, 63] = 0.05, 0.95  # claims 95% pass
    assert model_metrics(sure, passed, bins).calibration_error > 0.3


def test_crps_is_the_distributions_absolute_error_less_half_its_spread():
    from memory_distill.evaluate import crps, reward_histogram

    bins = RewardBins(-1.0, 2.0, 64)
    c = bins.centers.astype(np.float64)
    rng = np.random.default_rng(1)
    p, r = rng.dirichlet(np.full(64, 0.3), size=20), rng.uniform(-1, 2, size=20)
    brute = np.mean([(pi * np.abs(c - ri)).sum() - 0.5 * (np.outer(pi, pi) * np.abs(c[:, None] - c[None, :])).sum()
                     for pi, ri in zip(p, r, strict=True)])
    assert crps(p, r, bins) == pytest.approx(brute, rel=1e-10)
    # a point forecast's CRPS is its absolute error
    assert crps(bins.hard_targets(r), r, bins) == pytest.approx(np.abs(c[bins.to_index(r)] - r).mean(), rel=1e-10)
    # knowing each reward's neighbourhood beats the marginal of all rewards
    near = bins.hl_gauss_targets(r)
    marginal = np.tile(near.mean(0), (len(r), 1))
    assert crps(near, r, bins) < 0.2 * crps(marginal, r, bins)
    # the base-rate forecast: the share of the (rewarded) training rewards in each bin
    hist = reward_histogram(np.array([0.0, 0.0, 1.5, np.nan]), bins)
    assert hist is not None and hist[bins.to_index(np.array([0.0]))[0]] == pytest.approx(2 / 3) and hist.sum() == 1
    assert reward_histogram(np.array([np.nan]), bins) is None


def test_model_sizes_at_1536():
    teacher, student = build_teacher(TeacherConfig(), 1536, 64), build_student(DistillConfig(), 1536, 64)
    # 1536-1024-512-256-128-64 Linear layers + BatchNorm affine params: the "~2.3M" of the design
    linear = sum(a * b + b for a, b in [(1536, 1024), (1024, 512), (512, 256), (256, 128), (128, 64)])
    assert param_count(teacher) == linear + 2 * (1024 + 512 + 256 + 128) == 2_275_008
    assert compression_ratio(teacher, student) >= 3.7
    x = torch.randn(5, 1536)
    teacher.eval()
    out = teacher(x)
    assert out.shape == (5, 64) and not torch.allclose(out.softmax(-1).sum(-1), out.sum(-1))  # logits, not probs
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in teacher.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in student.modules())
    assert [m.p for m in teacher.modules() if isinstance(m, torch.nn.Dropout)] == [0.2] * 4
    assert [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)] == [0.1] * 2


def test_arch_roundtrip():
    m = RewardMLP(32, [16, 8], 10, dropout=0.1, batchnorm=True)
    m2 = RewardMLP.from_arch(m.arch())
    m2.load_state_dict(m.state_dict())
    m.eval()
    m2.eval()
    x = torch.randn(3, 32)
    torch.testing.assert_close(m(x), m2(x))
    with pytest.raises(ValueError, match="bad RewardMLP shape"):
        RewardMLP(0, [4], 10)


def test_loading_a_saved_model_draws_nothing_from_torchs_rng():
    """RewardMLP.load builds on the meta device and takes the saved tensors: the same model, and the global RNG
    (which a training thread or the application may be using) is where it was. A mismatched state dict raises."""
    m = RewardMLP(32, [16, 8], 10, dropout=0.1, batchnorm=True, n_features=3).eval()
    m.set_ranking(torch.randn(35), mean_weight=0.5, centers=torch.linspace(0, 1, 10))
    state = torch.random.get_rng_state()
    m2 = RewardMLP.load(m.arch(), m.state_dict()).eval()
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.randn(3, 35)
    torch.testing.assert_close(m2(x), m(x))
    torch.testing.assert_close(m2.advantage(x), m.advantage(x))
    assert all(p.requires_grad and p.device.type == "cpu" for p in m2.parameters())  # trainable (warm start)
    with pytest.raises(RuntimeError, match="size mismatch|Missing key"):
        RewardMLP.load({**m.arch(), "hidden": [16, 4]}, m.state_dict())


@pytest.mark.parametrize(("n", "batch_size"), [(17, 16), (33, 16), (513, 256), (32, 16), (5, 16), (1, 16)])
def test_teacher_epoch_batches_cover_every_row_once(n, batch_size):
    """A one-row remainder (BatchNorm cannot train on it) joins the batch before it. It used to replace the
    batch two before the end instead: past two batches, one batch of rows was dropped and another seen twice
    every epoch (and with exactly two, the run failed with an IndexError)."""
    from memory_distill.teacher import _batch_indices

    batches = _batch_indices(n, batch_size, torch.Generator().manual_seed(0))
    rows = torch.cat(batches).tolist()
    assert sorted(rows) == list(range(n))
    assert len(batches) == 1 or all(b.numel() >= 2 for b in batches)
