import pytest
from PIL import Image

from offset_cir import plots

pytest.importorskip("matplotlib")


def test_a_saved_figure_is_a_whole_png_and_no_backend_is_switched(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    fig = plots.new_figure((2, 1), dpi=50)
    fig.subplots().plot([0, 1], [1, 0])
    out = plots.save_figure(fig, tmp_path / "sub" / "fig.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (100, 50)
    assert matplotlib.get_backend() == backend
    assert [p.name for p in out.parent.iterdir()] == ["fig.png"]  # no temporary left beside it


def test_a_failed_save_keeps_the_old_file(tmp_path):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")

    class Broken:
        def savefig(self, *a, **k):
            raise RuntimeError("renderer failed")

    with pytest.raises(RuntimeError):
        plots.save_figure(Broken(), target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
