"""The logit cache: the writer against the tiny teacher's own top-k, resume, 2 ranks == 1,
refusals, and training from it (2 ranks, resume, world-size change, while it is written)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fbi.configure import compose
from fbi_testing import REPO, make_teacher, run_train

pytestmark = pytest.mark.slow

WRITER = REPO / "fbi" / "distill" / "cache_writer.py"


@pytest.fixture(scope="module")
def base(tiny_run) -> list[str]:
    return tiny_run + ["teacher=cache", "teacher.cache.mode=topk", "teacher.cache.k=8",
                       "teacher.cache.part_samples=8",
                       "teacher.cache.value_dtype=float32", "teacher.cache.tail=lumped"]


def write(base, directory: Path, *extra, nproc=1) -> subprocess.CompletedProcess:
    return run_train(base + [f"teacher.cache.dir={directory}", *extra], script=WRITER,
                     nproc=nproc)


def data_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def open_cache(base, directory: Path, *extra):
    from fbi.data.shards import TokenShards
    from fbi.distill.cache import CacheTeacher
    from fbi.distill.teacher_checkpoint import resolve_path

    cfg = compose(base + [f"teacher.cache.dir={directory}", *extra])
    shards = next((Path(cfg.cache_dir) / "shards").iterdir())
    train = TokenShards(shards, "train", cfg.data.seq_len)
    from fbi.data.shards import Manifest

    fingerprint = Manifest.load(shards).tokenizer_fingerprint
    return CacheTeacher(cfg, resolve_path(cfg.teacher), shards, train, fingerprint,
                        torch.device("cpu")), train


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, base) -> Path:
    directory = tmp_path_factory.mktemp("topk") / "cache"
    write(base, directory)
    return directory


def test_topk_round_trip_equals_the_teachers_own(base, topk_cache, teacher_dir):
    from transformers import AutoModelForCausalLM

    from fbi.distill.cache import Walk, load_manifest
    from fbi.distill.loss import distillation_loss

    source, train = open_cache(base, topk_cache)
    manifest = load_manifest(topk_cache)
    assert manifest["complete"] and manifest["id_dtype"] == "uint16"  # a 512-token vocabulary
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    walk = Walk(manifest)
    for part in (0, 5):  # the batch the writer ran as one
        ids = walk.part_ids(part).tolist()
        assert walk.parts(ids) == [part]
        batch = torch.from_numpy(train.batch(ids))
        with torch.no_grad():
            logits = teacher(input_ids=batch[:, :-1]).logits
        logp = F.log_softmax(logits.double(), dim=-1)
        want_vals, want_ids = logp.topk(8, dim=-1)
        got = source.targets(ids, batch[:, :-1])
        assert torch.equal(got.ids, want_ids)
        torch.testing.assert_close(got.weights.double(), want_vals.exp(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.tail.double(), 1 - want_vals.exp().sum(-1),
                                   rtol=1e-4, atol=1e-6)
        # The loss from the cache equals the online loss restricted to the same support.
        student = torch.randn(logits.shape, dtype=torch.float64, requires_grad=True)
        listed = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, want_ids, True)
        logp_s = F.log_softmax(student, -1)
        rest = torch.logsumexp(logp_s.masked_fill(listed, float("-inf")), -1)
        reference = (-(want_vals.exp() * logp_s.gather(-1, want_ids)).sum(-1)
                     - (1 - want_vals.exp().sum(-1)) * rest).mean()
        from_cache = distillation_loss(student.float(), got, batch[:, 1:]).loss
        torch.testing.assert_close(from_cache.double(), reference, rtol=1e-5, atol=1e-6)
        # soft_ce, logged by every source, reads as the online teacher's for a student whose
        # tail is flat (as at initialization), where the lumped loss is lower by the spread.
        flat = 0.1 * torch.randn(logits.shape)
        online = distillation_loss(flat, logits, batch[:, 1:])
        cached = distillation_loss(flat, got, batch[:, 1:])
        assert abs(cached.soft_ce.item() - online.soft_ce.item()) < 0.02
        assert online.distill.item() - cached.distill.item() > 1.0


def written_parts(directory: Path) -> int:
    from fbi.distill.cache import load_manifest, num_parts
    from fbi.distill.progress import Progress

    progress = Progress(directory, num_parts(load_manifest(directory)))
    progress.refresh()
    return sum(progress.has(p) for p in range(progress.num_parts))


def test_interrupted_job_resumed_gives_identical_files(base, topk_cache, tmp_path):
    from fbi.distill.cache import CacheWaitError, Walk, load_manifest, num_parts

    directory = tmp_path / "cache"
    write(base, directory, "teacher.cache.max_parts=3")  # stops as a time-limited job would
    assert not load_manifest(directory)["complete"]
    assert written_parts(directory) == 3
    assert len(list(directory.rglob("*"))) < 20  # no file per part
    source, _ = open_cache(base, directory)
    walk = Walk(load_manifest(directory))
    assert source.targets(walk.part_ids(0).tolist(), None).ids.shape == (8, 32, 8)  # written
    with pytest.raises(CacheWaitError, match=r"part 10 is not written and the cache job "
                                             r"stopped on purpose after teacher.cache.max_parts=3 "
                                             r".*resume it .*: python -m fbi.distill.cache_writer"):
        source.targets(walk.part_ids(10)[:4].tolist(), None)
    with open(sorted(directory.glob("*.ids"))[0], "r+b") as f:  # a part cut off mid-write
        f.seek(20 * 32 * 8 * 2)
        f.write(b"\xff" * 4096)
    proc = write(base, directory)
    total = num_parts(load_manifest(directory))
    assert f"rank 0 wrote {total - 3} parts" in proc.stderr  # only what was missing
    assert data_files(directory) == data_files(topk_cache)


@pytest.mark.parametrize("old_format", [1, 2])
def test_an_old_format_cache_is_refused_with_the_command_that_converts_it(
        base, topk_cache, tmp_path, old_format):
    from fbi.config import ConfigError
    from fbi.distill.cache import load_manifest, num_parts

    old = tmp_path / "old"
    shutil.copytree(topk_cache, old, ignore=shutil.ignore_patterns("*.crc", *(
        ("progress", "writers") if old_format == 1 else ())))
    manifest = load_manifest(old)
    if old_format == 1:
        (old / "parts").mkdir()
        for part in range(num_parts(manifest)):  # format 1: a marker per part
            (old / "parts" / f"{part:08d}").touch()
    for key in ("teacher_dtype", "generator"):  # not recorded before format 3
        del manifest[key]
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": old_format}))
    with pytest.raises(ConfigError, match=f"format-{old_format} cache .* python -m "
                                          f"fbi.distill.convert {old}"):
        open_cache(base, old)
    subprocess.run([sys.executable, "-m", "fbi.distill.convert", str(old)],
                   check=True, cwd=REPO)
    assert not (old / "parts").exists() and written_parts(old) == num_parts(manifest)
    source, _ = open_cache(base, old)
    assert torch.equal(source.targets([5, 2], None).ids, open_cache(base, topk_cache)[0]
                       .targets([5, 2], None).ids)
    for name, data in data_files(topk_cache).items():
        if name.endswith(".crc"):  # the checksums the writer recorded, recomputed
            assert (old / name).read_bytes() == data


def test_a_cache_job_with_another_teacher_dtype_is_refused(base, tmp_path):
    from fbi.config import ConfigError

    directory = tmp_path / "cache"
    write(base, directory, "teacher.cache.max_parts=1")
    proc = run_train(base + [f"teacher.cache.dir={directory}", "teacher.dtype=bfloat16"],
                     script=WRITER, check=False)
    assert proc.returncode != 0
    assert "written for another teacher_dtype: 'float32' there, 'bfloat16' here" in proc.stderr


@pytest.mark.multiprocess
def test_two_ranks_write_the_same_files_as_one(base, topk_cache, tmp_path):
    write(base, tmp_path / "cache", nproc=2)
    assert data_files(tmp_path / "cache") == data_files(topk_cache)


def test_sampled_cache_is_resumable_and_counts_its_draws(base, tmp_path):
    extra = ["teacher.cache.mode=sampled", "teacher.cache.draws=16"]
    write(base, tmp_path / "a", *extra)
    write(base, tmp_path / "b", *extra, "teacher.cache.max_parts=2")
    write(base, tmp_path / "b", *extra)
    assert data_files(tmp_path / "a") == data_files(tmp_path / "b")
    source, train = open_cache(base, tmp_path / "a", *extra)
    got = source.targets([3, 1, 4], None)
    assert got.tail is None and got.ids.shape == (3, 32, 16)
    torch.testing.assert_close(got.weights.sum(-1), torch.ones(3, 32))
    counts = np.concatenate([np.fromfile(p, dtype=np.uint8)
                             for p in sorted((tmp_path / "a").glob("*.vals"))])
    assert counts.size == train.num_samples * 32 * 16  # one byte per count, 16 slots


def test_a_cache_for_another_teacher_or_other_shards_is_refused(base, topk_cache, tmp_path,
                                                                 tokenizer_dir):
    from fbi.config import ConfigError

    other = make_teacher(tmp_path / "other", tokenizer_dir, seed=1)
    with pytest.raises(ConfigError, match="written for another teacher"):
        open_cache(base, topk_cache, f"teacher.path={other}")
    with pytest.raises(ConfigError, match="written for another slots"):
        open_cache(base, topk_cache, "teacher.cache.k=4")
    with pytest.raises(ConfigError, match="written for another temperature"):
        open_cache(base, topk_cache, "distill.temperature=2.0")
    for key, change, message in [
        ("token_shards", lambda m: m["token_shards"][0].update(sha256="0" * 64), "token shards"),
        ("tokenizer_fingerprint", lambda m: m.update(tokenizer_fingerprint="0" * 16), "tokenizer"),
    ]:
        copy = tmp_path / key
        shutil.copytree(topk_cache, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ConfigError, match=f"written for another {message}"):
            open_cache(base, copy)


def steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def sample_ids(run_dir: Path) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for f in (run_dir / "samples").glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(i for mb in rec["ids"] for i in mb)
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.multiprocess
def test_training_from_cache_on_two_ranks_with_resume_reads_the_right_entries(
        base, topk_cache, tmp_path):
    args = base + [f"teacher.cache.dir={topk_cache}", "logging.sample_ids=true",
                   "optim.decay_steps=8", "checkpoint_every=4"]
    run_train(args + [f"run_dir={tmp_path / 'one'}", "max_steps=8"])
    run_train(args + [f"run_dir={tmp_path / 'split'}", "max_steps=4"], nproc=2)
    run_train(args + [f"run_dir={tmp_path / 'split'}", "max_steps=8", "resume=true"])
    one, split = steps(tmp_path / "one"), steps(tmp_path / "split")
    assert [s["step"] for s in split] == list(range(1, 9))
    assert sample_ids(tmp_path / "split") == sample_ids(tmp_path / "one")
    # Another entry read for any sample would change that step's distillation loss.
    assert [s["distill"] for s in split] == pytest.approx([s["distill"] for s in one], rel=1e-5)
    assert all(s["soft_ce"] > s["distill"] for s in one)  # the lumped tail's spread, added
    # Evaluation's teacher part: the perplexity the cache job measured on the same batches.
    final = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])
    recorded = json.loads((topk_cache / "manifest.json").read_text())["eval"]
    assert final["val_ppl_teacher"] == recorded["val_ppl_teacher"] > 1


def test_training_while_the_cache_is_written_equals_training_from_the_finished_cache(
        base, topk_cache, tmp_path):
    import os

    args = base + ["max_steps=6", "optim.decay_steps=6", "teacher.cache.wait_s=300",
                   "checkpoint_every=100"]
    run_train(args + [f"teacher.cache.dir={topk_cache}", f"run_dir={tmp_path / 'finished'}"])
    streaming, follow = tmp_path / "streaming", tmp_path / "follow"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    trainer = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, f"teacher.cache.dir={streaming}",
         f"run_dir={follow}"], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: list[str] = []
    for line in trainer.stdout:  # the trainer starts first and waits for the job
        seen.append(line)
        if "waiting for" in line:
            break
    # The job writes one part (the first step's 8 samples, in the trainer's order) and stops
    # on purpose; the trainer takes its step, finds the job stopped, checkpoints and says how
    # to resume the job; resumed, the job writes the rest, and so does the trainer.
    write(base, streaming, "teacher.cache.max_parts=1")
    log = "".join(seen) + trainer.communicate(timeout=600)[0]
    assert trainer.returncode == 3, log[-4000:]
    assert ("part 1 is not written and the cache job stopped on purpose after "
            "teacher.cache.max_parts=1 parts per rank; resume it") in log
    command = log.split("(it writes only the missing parts): ")[1].split(" (after step")[0]
    assert command.startswith("python -m fbi.distill.cache_writer ") and \
        f"teacher.cache.dir={streaming}" in command
    assert "after step 1, checkpoint step_00000001" in log
    write(base, streaming)
    run_train(args + [f"teacher.cache.dir={streaming}", f"run_dir={follow}", "resume=auto"])
    assert data_files(streaming) == data_files(topk_cache)
    finished, followed = steps(tmp_path / "finished"), steps(follow)
    assert [s["loss"] for s in followed] == [s["loss"] for s in finished]


def test_a_bad_row_is_refused_naming_shard_row_and_part(base, topk_cache, tmp_path):
    from fbi.distill.cache import CacheRowError, Walk, load_manifest

    copy = tmp_path / "copy"
    shutil.copytree(topk_cache, copy)
    walk = Walk(load_manifest(copy))
    sample = int(walk.part_ids(1)[5])
    source, train = open_cache(base, copy)
    shard, row = train.locate(sample)
    stem = Path(load_manifest(copy)["token_shards"][shard]["file"]).stem  # the sample's shard
    ids = np.memmap(copy / f"{stem}.ids", np.uint16, "r+").reshape(-1, 32, 8)
    other = (row + 1) % len(ids)
    ids[[row, other]] = ids[[other, row]]  # each row's ids under the other's values
    ids.flush()
    writer = next((copy / "progress").glob("*.log")).stem
    with pytest.raises(CacheRowError, match=rf"row {row} of {stem} \(sample id {sample}, part 1, "
                                            rf"written by {writer}\) fails its checksum"):
        open_cache(base, copy)[0].targets([sample], None)
    ids[[row, other]] = ids[[other, row]]
    ids[row, 4, 1] = 600  # beyond the 512-token vocabulary
    ids.flush()
    with pytest.raises(CacheRowError, match=rf"row {row} of {stem}.ids/.vals \(sample id "
                                            rf"{sample}, part 1\), position 4, holds a token id "
                                            r">= the vocabulary size 512"):
        open_cache(base, copy)[0].targets([int(walk.part_ids(0)[0]), sample], None)
    ids[row] = 0  # a row never written
    ids.flush()
    vals = np.memmap(copy / f"{stem}.vals", np.float32, "r+").reshape(-1, 32, 8)
    vals[row] = 0
    vals.flush()
    with pytest.raises(CacheRowError, match=rf"row {row} .* position 0, holds a token id listed"):
        open_cache(base, copy)[0].targets([sample], None)


def test_the_default_cache_folder_is_keyed_by_the_teacher(base, tmp_path, tokenizer_dir,
                                                          teacher_dir):
    from fbi.distill.cache import cache_dir

    other = make_teacher(tmp_path / "other", tokenizer_dir, seed=1)
    cfg = compose(base)
    a, b = cache_dir(cfg, tmp_path / "shards", teacher_dir), cache_dir(cfg, tmp_path / "shards",
                                                                       other)
    assert a != b and a.parent.parent == b.parent.parent


def test_uint8_cache_with_the_label_tail_matches_the_float_cache(base, topk_cache, tmp_path):
    from fbi.distill.cache import load_manifest
    from fbi.distill.cache_files import file_names

    extra = ["teacher.cache.value_dtype=uint8", "teacher.cache.tail=label"]
    write(base, tmp_path / "u8", *extra)
    names = file_names(load_manifest(tmp_path / "u8"))
    stem = names[0].removesuffix(".ids")
    assert names[:2] == [f"{stem}.ids", f"{stem}.vals"]  # no .tail: implied by the units
    assert not (tmp_path / "u8" / f"{stem}.tail").exists()
    exact, train = open_cache(base, topk_cache)
    compact, _ = open_cache(base, tmp_path / "u8", *extra)
    ids = [3, 1, 4, 15]
    want, got = exact.targets(ids, None), compact.targets(ids, None)
    labels = torch.from_numpy(train.batch(ids)[:, 1:].astype(np.int64))
    assert torch.equal(got.ids[..., :8], want.ids) and torch.equal(got.ids[..., 8], labels)
    assert (got.weights[..., :8] - want.weights).abs().max() < 1 / 255
    torch.testing.assert_close(got.weights.sum(-1) + got.tail, torch.ones(4, 32))
