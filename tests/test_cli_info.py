"""`python -m ferrum_mps info` against gguf-py's own reader."""

import json
import subprocess
import sys
from collections import defaultdict

import numpy as np

from ferrum_mps.cli import main
from test_gguf import write_small


def expected_types(summary):
    types = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for _, qtype, _, n_elements, n_bytes, _ in summary["tensors"]:
        types[qtype.name]["tensors"] += 1
        types[qtype.name]["parameters"] += n_elements
        types[qtype.name]["bytes"] += n_bytes
    return dict(types)


def run_info(path, capsys, *extra):
    assert main(["info", str(path), *extra]) == 0
    return capsys.readouterr().out


def test_info_gemma_matches_gguf_reader(gemma_gguf_path, gemma_reader_summary, capsys):
    ref = gemma_reader_summary
    got = json.loads(run_info(gemma_gguf_path, capsys, "--json"))
    fields = ref["fields"]
    assert got["architecture"] == fields["general.architecture"] == "gemma3"
    assert got["tensor_count"] == len(ref["tensors"]) == 236
    assert got["types"] == expected_types(ref)
    assert got["parameters"] == sum(t[3] for t in ref["tensors"])
    assert got["tensor_bytes"] == sum(t[4] for t in ref["tensors"])
    hp = {k[len("gemma3."):]: v for k, v in fields.items() if k.startswith("gemma3.")}
    assert got["hyperparameters"] == hp and hp["block_count"] == 18
    assert got["tokenizer"]["tokens"] == len(fields["tokenizer.ggml.tokens"])

    text = run_info(gemma_gguf_path, capsys)
    assert "architecture:  gemma3" in text
    for name, row in expected_types(ref).items():  # one table line per type with its counts
        line = next(l for l in text.splitlines() if l.split()[:1] == [name])
        assert line.split()[1:4] == [str(row["tensors"]), f"{row['parameters']:,}", f"{row['bytes']:,}"]
    assert f"{got['parameters']:,} parameters" in text
    assert "block_count" in text and "attention.head_count_kv" in text


def test_info_small_file_as_a_module(tmp_path):
    path = tmp_path / "small.gguf"
    expect = write_small(path, np.random.default_rng(0))
    out = subprocess.run([sys.executable, "-m", "ferrum_mps", "info", "--json", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["architecture"] == "llama" and got["tensor_count"] == len(expect)
    assert got["types"]["Q4_K"] == {"tensors": 1, "parameters": 3 * 512, "bytes": 3 * 2 * 144}
    assert got["parameters"] == sum(int(np.prod(shape)) for _, shape, _ in expect.values())
    assert got["hyperparameters"]["block_count"] == 2


def test_info_bad_files(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not a GGUF file" in err and "Traceback" not in err
    assert main(["info", str(tmp_path / "missing.gguf")]) == 1
    assert "no such GGUF file" in capsys.readouterr().err
