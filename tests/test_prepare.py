"""prepare with real Ray Data on real parquet files: exact tokens, the split, the cache, crashes, bad inputs."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fwray import config
from fwray import prepare as prepare_command
from fwray.core import tokens
from fwray.data import parquet_inputs, prepare as prep
from fwray.data.prepare import PrepareError

ROOT = Path(__file__).resolve().parent.parent
VAL = 0.05  # enough val documents in 495 to test the split


def experiment(paths, cache, **data):
    return config.from_dict({"train": {"max_iters": 10, "batch_size": 2}, "model": {"block_size": 64},
                             "data": {"paths": [str(p) for p in paths], "cache_dir": str(cache),
                                      "val_fraction": VAL, **data}})


def read_split(folder, manifest, split) -> np.ndarray:
    parts = [np.fromfile(p, dtype=tokens.TOKEN_DTYPE) for p in tokens.split_files(folder, manifest, split)]
    return np.concatenate(parts) if parts else np.empty(0, tokens.TOKEN_DTYPE)


def reference(table: pa.Table, ids: list[str]) -> dict[str, np.ndarray]:
    """One process, no Ray, plain tiktoken: every document with its EOT, split by id, in file order."""
    enc = tokens.get_tokenizer()
    docs = [np.array([tokens.EOT, *enc.encode_ordinary(t)], dtype=tokens.TOKEN_DTYPE)
            for t in table.column("text").to_pylist()]
    is_val = [tokens.is_validation(i, VAL) for i in ids]
    return {s: np.concatenate([d for d, v in zip(docs, is_val) if v == (s == "val")]) for s in ("train", "val")}


@pytest.fixture(scope="module")
def table(corpus):
    return pq.read_table(corpus)


@pytest.fixture(scope="module")
def prepared(ray_session, corpus, tmp_path_factory):
    """The corpus cut into 5 tasks (row ranges of its single row group)."""
    exp = experiment([corpus], tmp_path_factory.mktemp("cache"), rows_per_task=100)
    folder, manifest = prep.prepare(exp, progress=False)
    return exp, folder, manifest


def test_tokens_equal_a_single_process_reference(prepared, table):
    _, folder, manifest = prepared
    want = reference(table, table.column("id").to_pylist())
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split(folder, manifest, split), want[split])
    assert manifest["splits"]["val"]["documents"] > 5


def test_every_document_is_eot_then_token_count_tokens(prepared, table):
    _, folder, manifest = prepared
    counts = dict(zip(table.column("id").to_pylist(), table.column("token_count").to_pylist()))
    seen = 0
    for split in ("train", "val"):
        toks = read_split(folder, manifest, split)
        starts = np.flatnonzero(toks == tokens.EOT)
        assert starts[0] == 0
        lengths = np.diff(np.append(starts, len(toks)))
        want = [counts[i] + 1 for i in table.column("id").to_pylist() if tokens.is_validation(i, VAL) == (split == "val")]
        assert lengths.tolist() == want
        seen += len(lengths)
    assert seen == table.num_rows


def test_manifest(prepared, corpus):
    exp, folder, manifest = prepared
    assert folder.name == manifest["fingerprint"][:16] and folder.parent == Path(exp.data.cache_dir).resolve()
    assert (manifest["tokenizer"], manifest["eot"], manifest["dtype"]) == ("gpt2", 50256, "uint16")
    assert manifest["split_rule"] == tokens.SPLIT_RULE and manifest["val_fraction"] == VAL
    assert manifest["inputs"][0]["path"] == str(corpus.resolve()) and manifest["inputs"][0]["rows"] == 495
    assert manifest["settings"]["rows_per_task"] == 100 and "num_workers" not in manifest["settings"]
    assert manifest["token_count"] == {"column_sum": 3_552_541, "produced_without_eot": 3_552_541, "matches": True}
    assert manifest["skipped"] == {"null_or_empty": 0, "min_language_score": 0, "min_chars": 0}
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 495
    assert len(manifest["splits"]["train"]["files"]) == 5
    for split in ("train", "val"):
        for f in manifest["splits"][split]["files"]:
            data = (folder / f["name"]).read_bytes()
            assert len(data) == 2 * f["tokens"]
            assert __import__("hashlib").sha256(data).hexdigest() == f["sha256"]
    assert manifest["chars"] == 11_044_695 and manifest["seconds"] > 0


def test_each_split_counts_the_utf8_bytes_of_its_text(prepared, table):
    """The bytes bits per byte divides by: the documents' text as UTF-8, which is what their tokens spell (EOT none)."""
    _, folder, manifest = prepared
    enc = tokens.get_tokenizer()
    splits = manifest["splits"]
    texts = table.column("text").to_pylist()
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == sum(len(t.encode()) for t in texts)
    val = read_split(folder, manifest, "val")
    assert splits["val"]["bytes"] == len(enc.decode_bytes(val[val != tokens.EOT].tolist()))


def test_cache_hit_reads_nothing_and_writes_nothing(prepared):
    exp, folder, manifest = prepared
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again_folder, again = prep.prepare(exp, progress=False)
    assert (again_folder, again) == (folder, manifest)  # same `seconds`: the manifest was read, not rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_fingerprint_changes_with_inputs_and_settings(corpus, tmp_path):
    data = experiment([corpus], tmp_path).data
    files = [parquet_inputs.inspect_file(corpus, data)]
    base = parquet_inputs.fingerprint(files, parquet_inputs.output_settings(data), 1)
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(corpus.read_bytes())
    moved = [parquet_inputs.inspect_file(copy, data)]
    assert moved[0].fingerprint == files[0].fingerprint  # same content: same fallback ids
    changed = [
        parquet_inputs.fingerprint(moved, parquet_inputs.output_settings(data), 1),
        parquet_inputs.fingerprint(files, parquet_inputs.output_settings(data), 2),
        *(parquet_inputs.fingerprint(files, parquet_inputs.output_settings(
            experiment([corpus], tmp_path, **{k: v}).data), 1)
          for k, v in [("val_fraction", 0.1), ("min_chars", 5), ("text_column", "url"), ("rows_per_task", 7)]),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    same = experiment([corpus], tmp_path / "elsewhere", num_workers=1).data
    assert parquet_inputs.fingerprint(files, parquet_inputs.output_settings(same), 1) == base
    os.utime(copy, ns=(time.time_ns(), time.time_ns()))
    assert parquet_inputs.fingerprint([parquet_inputs.inspect_file(copy, data)], parquet_inputs.output_settings(data),
                                      1) != changed[0]


def test_adding_a_file_moves_no_document(prepared, table, corpus, tmp_path):
    """A second file without an id column (fallback ids) adds documents; the corpus's keep their split."""
    exp, folder, manifest = prepared
    extra = tmp_path / "no-ids.parquet"
    pq.write_table(table.slice(0, 40).drop_columns(["id"]), extra)
    folder2, manifest2 = prep.prepare(experiment([corpus, extra], exp.data.cache_dir, rows_per_task=100),
                                      progress=False)
    assert folder2 != folder
    for split in ("train", "val"):
        old, new = read_split(folder, manifest, split), read_split(folder2, manifest2, split)
        np.testing.assert_array_equal(new[:len(old)], old)
    key = manifest2["inputs"][1]["fingerprint"]
    val_rows = [r for r in range(40) if tokens.is_validation(tokens.fallback_id(key, r), VAL)]
    assert manifest2["splits"]["val"]["documents"] == manifest["splits"]["val"]["documents"] + len(val_rows)
    assert manifest2["splits"]["train"]["documents"] == manifest["splits"]["train"]["documents"] + 40 - len(val_rows)


def test_filters_and_empty_texts_are_counted(ray_session, table, tmp_path):
    small = table.slice(0, 60)
    texts = small.column("text").to_pylist()
    texts[0], texts[1], texts[2] = None, "", "short"
    small = small.set_column(0, "text", pa.array(texts))
    path = tmp_path / "small.parquet"
    pq.write_table(small, path, row_group_size=16)  # 4 row groups, merged into tasks of 25 rows or fewer
    scores = small.column("language_score").to_pylist()
    lengths = [len(t or "") for t in texts]
    low = sum(1 for s, n in zip(scores, lengths) if n > 0 and s < 0.9)
    short = sum(1 for s, n in zip(scores, lengths) if 0 < n < 100 and s >= 0.9)
    _, manifest = prep.prepare(experiment([path], tmp_path / "cache", min_language_score=0.9, min_chars=100,
                                          rows_per_task=25), progress=False)
    assert manifest["skipped"] == {"null_or_empty": 2, "min_language_score": low, "min_chars": short}
    kept = manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    assert kept == 60 - 2 - low - short > 0
    assert manifest["token_count"]["matches"]


def test_a_killed_prepare_leaves_no_entry_and_a_rerun_completes(prepared, corpus, tmp_path):
    _, folder, manifest = prepared
    cache = tmp_path / "cache"
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(f"train: {{max_iters: 10}}\ndata: {{paths: ['{corpus}'], cache_dir: '{cache}', "
                        f"val_fraction: {VAL}, rows_per_task: 20}}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fwray.prepare", str(exp_file)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not list(cache.glob("*.tmp-*/*.bin")):  # mid-way: shards are being written
            assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not list(cache.glob("*/manifest.json"))  # nothing looks whole
    assert list(cache.glob("*.tmp-*"))
    folder2, manifest2 = prep.prepare(config.load(exp_file), progress=False)
    assert [p.name for p in cache.iterdir()] == [folder2.name]  # the dead run's temp folder is gone
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split(folder2, manifest2, split), read_split(folder, manifest, split))


# ---------------------------------------------------------------- bad inputs


def expect_error(exp, *words):
    with pytest.raises(PrepareError) as e:
        prep.prepare(exp, progress=False)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not list(Path(exp.data.cache_dir).glob("*/manifest.json"))
    assert not list(Path(exp.data.cache_dir).glob("*.tmp-*"))
    return message


def test_bad_paths(tmp_path):
    expect_error(experiment([tmp_path / "nope.parquet"], tmp_path), "nope.parquet", "not found", "data.paths")
    expect_error(experiment([tmp_path / "*.parquet"], tmp_path), "*.parquet", "matches no files")


def test_bad_files(table, tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_text("id,text\n1,hello\n")
    expect_error(experiment([junk], tmp_path), "junk.parquet", "not a parquet file")
    cut = tmp_path / "cut.parquet"
    pq.write_table(table.slice(0, 20), cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    expect_error(experiment([cut], tmp_path), "cut.parquet", "truncated")
    empty = tmp_path / "empty.parquet"
    pq.write_table(table.schema.empty_table(), empty)
    expect_error(experiment([empty], tmp_path), "empty.parquet", "no rows")


def test_bad_columns(corpus, tmp_path):
    expect_error(experiment([corpus], tmp_path, text_column="body"), "python-docs.parquet", "'body'",
                 "data.text_column")
    expect_error(experiment([corpus], tmp_path, text_column="token_count"), "not strings", "data.text_column")
    no_score = tmp_path / "no-score.parquet"
    pq.write_table(pq.read_table(corpus, columns=["text", "id"]).slice(0, 5), no_score)
    expect_error(experiment([no_score], tmp_path, min_language_score=0.5), "no-score.parquet", "language_score")


def test_everything_filtered_out(ray_session, table, tmp_path):
    path = tmp_path / "tiny.parquet"
    pq.write_table(table.slice(0, 10), path)
    expect_error(experiment([path], tmp_path / "cache", min_chars=10**9), "tiny.parquet", "every row was skipped",
                 "min_chars: 10")


def test_disk_full_while_writing(ray_session, table, tmp_path, monkeypatch):
    path = tmp_path / "tiny.parquet"
    pq.write_table(table.slice(0, 10), path)
    monkeypatch.setenv(prep.FAIL_WRITE_ENV, "1000")  # read by the driver, applied by the writers in Ray workers
    message = expect_error(experiment([path], tmp_path / "cache"), "No space left on device", "tiny.parquet",
                           "data.cache_dir")
    assert "Traceback" not in message and "Ray" not in message


def test_main_reports_errors_in_one_line(tmp_path, capsys):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text("train: {max_iters: 10}\ndata: {paths: [missing.parquet]}\n")
    assert prepare_command.main([str(exp_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fwray: error: ") and err.count("\n") == 1 and "missing.parquet" in err
    assert prepare_command.main([str(exp_file), "data.bogus=1"]) == 2
    assert "data.bogus" in capsys.readouterr().err


def test_main_prints_a_summary(prepared, corpus, tmp_path, capsys):
    exp, folder, manifest = prepared
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(f"train: {{epochs: 2, batch_size: 2}}\nmodel: {{block_size: 64}}\n"
                        f"data: {{paths: ['{corpus}'], cache_dir: '{exp.data.cache_dir}', val_fraction: {VAL}, "
                        "rows_per_task: 100}\n")
    assert prepare_command.main([str(exp_file)]) == 0
    out = capsys.readouterr()
    assert str(folder) in out.out and "cached" in out.err
    assert "chars/token" in out.out and "2.00 epochs" in out.out
    assert f"{manifest['splits']['train']['tokens']:,} tokens" in out.out
