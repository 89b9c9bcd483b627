"""The shared plot drawing: axis from zero, the device and budget lines, the install hint without matplotlib."""

import pytest
from lightning_utilities.core.imports import RequirementCache

from lightning_memopt.core import plotting

MiB = 2**20


@pytest.fixture
def ax():
    plt = plotting.pyplot("test")
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_device_within_reach_is_drawn_with_its_budget(ax):
    top = plotting.draw_limits(ax, 32 * MiB, 0.1, 23 * MiB, MiB, "MiB")
    assert ax.get_ylim() == (0.0, top) and top >= 32
    assert [line.get_label() for line in ax.get_lines()] == ["device (32.0 MiB)", "budget (10% kept free)"]
    assert ax.get_lines()[1].get_ydata()[0] == pytest.approx(28.8)


def test_a_device_far_above_the_data_is_named_not_drawn(ax):
    top = plotting.draw_limits(ax, 24 * 2**30, 0.1, 23 * MiB, MiB, "MiB")
    assert not ax.get_lines() and top == pytest.approx(23 * 1.15)
    assert "device: 24,576.0 MiB (above the scale)" in [t.get_text() for t in ax.texts]


def test_clip_ends_the_axis_at_a_multiple_of_the_device(ax):
    top = plotting.draw_limits(ax, 80, 0.0, 600, 1, "GiB", clip=2.5)
    assert top == pytest.approx(80 * 2.5 * 1.15) and ax.get_ylim()[0] == 0


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    monkeypatch.setattr(plotting, "_MATPLOTLIB_AVAILABLE", RequirementCache("surely-not-installed-matplotlib"))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-memopt\[plot\]'"):
        plotting.pyplot("lightning-memopt plot --out")
