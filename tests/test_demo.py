"""The README's main command runs offline and writes images plus a contact sheet."""

from PIL import Image

from psalign import demo


def test_demo_writes_images_and_a_contact_sheet(tmp_path):
    sheet = demo.main(["--out", str(tmp_path), "--steps", "2"])
    images = sorted((tmp_path / "images").rglob("*.png"))
    assert len(images) == len(demo.DEMO_LEVELS) * len(demo.DEMO_PROMPTS)
    assert Image.open(sheet).size[0] > 4 * 100
    # running it again resumes: nothing is regenerated
    before = {p: p.stat().st_mtime_ns for p in images}
    demo.main(["--out", str(tmp_path), "--steps", "2"])
    assert {p: p.stat().st_mtime_ns for p in images} == before
