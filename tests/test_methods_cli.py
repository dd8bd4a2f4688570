"""`ficoco methods`: every method with the site it really acts on (from the steps it builds)."""
from ficoco import methods
from ficoco.contract import Needs
from ficoco.methods.cli import main, needs_text, sites


def test_sites_come_from_the_steps_each_method_builds():
    assert sites(methods.get("vanilla")) == []
    assert sites(methods.get("ficoco-v")) == ["vision encoder layers (between attention and MLP)"]
    assert sites(methods.get("ficoco-vl")) == ["vision encoder layers (between attention and MLP)",
                                               "LLM layers (layer input, prefill)"]
    assert sites(methods.get("visionzip"))[0].startswith("vision tower output")
    assert sites(methods.get("divprune"))[0].startswith("projector output")
    assert sites(methods.get("downsample"))[0].startswith("vision encoder input")
    assert sites(methods.get("fastv")) == ["LLM layers (layer input, prefill)"]


def test_listing_and_markdown_table_cover_every_method(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out
    assert main(["--markdown"]) == 0
    table = capsys.readouterr().out.splitlines()
    for name in methods.names():
        assert f"{name}  [phase:" in listing
    assert len(table) == 2 + len(methods.names())
    assert all(line.count(" | ") == 5 for line in table[2:])


def test_the_listing_says_what_each_method_needs_of_the_image_layout(capsys):
    assert main(["evit", "vscan", "fastv", "divprune"]) == 0
    listing = capsys.readouterr().out.split("\n\n")
    assert "  needs:     a CLS token first in the tower\n" in listing[0]             # EViT runs on each crop
    assert "  needs:     a CLS token first in the tower\n" in listing[1]             # VScan: tower and LLM
    # LLM reductions keep 1-D RoPE and 3-D M-RoPE positions alike (Qwen2-VL), so they need nothing
    assert "  needs:     nothing of the image layout" in listing[2] and "nothing of the image layout" in listing[3]
    assert needs_text(Needs(positions=("rope-1d",))) == "rope-1d LLM positions"
    # FiCoCo-V needs CLS for its default semantic term only, and says how to run without
    assert main(["ficoco-v"]) == 0
    assert ("  needs:     a CLS token first in the tower, on a tower without CLS run it with semantic='key-mean'\n"
            in capsys.readouterr().out)


def test_the_listing_says_which_method_reads_the_clip_text_tower(capsys):
    import json

    assert main(["cdpruner", "divprune"]) == 0
    listing = capsys.readouterr().out.split("\n\n")
    assert "the CLIP text tower of the vision tower's checkpoint" in listing[0]
    assert "text tower" not in listing[1]
    assert main(["--json", "cdpruner", "divprune"]) == 0
    assert [entry["needs_text_tower"] for entry in json.loads(capsys.readouterr().out)] == [True, False]


def test_the_json_listing_covers_every_method_with_its_default_needs(capsys):
    """FiCoCo-V's needs depend on its parameters (a function of them): the listing shows its defaults' needs."""
    import json

    from ficoco import methods

    assert main(["--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert sorted(listed) == sorted(methods.names())
    assert listed["ficoco-v"]["needs"]["cls_first"] is True                # semantic="cls", the default
