"""Bad input is refused before any work, naming the field, the value and the fix, and leaves
nothing behind (fbi.preflight; train.py prints it as one paragraph, exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fbi.config import ConfigError
from fbi.configure import compose
from fbi.preflight import preflight

from fbi_testing import REPO, run_train


def tiny(run_dir, *more):
    return ["experiment=none", f"run_dir={run_dir}", "max_steps=4", "teacher=none", *more]


@pytest.mark.parametrize("overrides, world, message", [
    (["global_batch_size=6", "micro_batch_size=4"], 1, "global_batch_size: 6 sequences"),
    (["global_batch_size=8", "micro_batch_size=4"], 3, "on 3 processes"),
    (["precision=fp16", "distributed.device=cpu"], 1, "precision: fp16 needs a GPU"),
    (["resume=true"], 1, "resume: resume=true but"),
    (["teacher=hf", "teacher.path=/nonexistent/teacher"], 1,
     "teacher.path: /nonexistent/teacher does not exist"),
    (["data=files", "data.files=[/nonexistent/*.txt]"], 1, "data.files: no file matches"),
    (["data=files", f"data.files=[{REPO}/README.md,{REPO}/requirements.txt]"], 1,
     r"data.files: got extensions \['.md', '.txt'\]; use files of one kind"),
])
def test_refused_before_anything_is_created(tmp_path, overrides, world, message):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        preflight(compose(tiny(run_dir, *overrides)), world)
    assert not run_dir.exists()


@pytest.mark.parametrize("override, message", [
    ("optim.grad_clip=-1", "optim.grad_clip: got -1.0"),
    ("optim.lr=-1", "optim.lr: must be positive"),
    ("distill.temperature=0", "distill.temperature: must be positive"),
    ("distill.ce_weight=1.5", "distill.ce_weight: must be in"),
    ("micro_batch_size=0", "micro_batch_size: must be positive"),
    ("zero.stage=4", "zero.stage: got 4"),
    ("guard.spike_action=panic", "guard.spike_action: got 'panic'"),
])
def test_wrong_values_name_the_field(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        compose(tiny(tmp_path / "run", override))


def test_teacher_that_is_not_a_causal_lm_or_too_short_is_refused(tmp_path, teacher_dir):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match="BertModel, not a causal language model"):
        preflight(compose(tiny(tmp_path / "r", "teacher=hf", f"teacher.path={encoder}")), 1)
    context = json.loads((teacher_dir / "config.json").read_text())["max_position_embeddings"]
    cfg = compose(tiny(tmp_path / "r", "teacher=hf", f"teacher.path={teacher_dir}",
                       f"data.seq_len={context + 1}"))
    with pytest.raises(ConfigError, match=f"data.seq_len: {context + 1} is beyond the teacher"):
        preflight(cfg, 1)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_train_py_prints_one_paragraph_and_exits_2(tmp_path):
    proc = run_train(tiny(tmp_path / "r", "teacher=hf", f"teacher.path={tmp_path}/none"),
                     REPO, check=False, timeout=120)
    assert proc.returncode == 2
    assert "teacher.path:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_binary_file_named_txt_is_refused_naming_the_byte(tmp_path, corpus):
    """Caught where the files are tokenized (reading a whole corpus is no preflight's job),
    still before any training, as one paragraph and exit code 2."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.txt").write_text((corpus / "part0.txt").read_text())
    (files / "b.txt").write_bytes("é fine so far\n".encode() + bytes([0x80, 0xFF, 0x00]) * 10)
    proc = run_train(tiny(tmp_path / "r", "data=files", f"data.files=[{files}/*.txt]",
                          f"cache_dir={tmp_path / 'cache'}"), REPO, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"data.files: {files / 'b.txt'} is not UTF-8 text (byte 15" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_misdeclared_sign_only_scheme_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    """zero.gather_signs on a scheme that declares SIGN_ONLY but reads |W|: the declaration
    passes config validation, the probe (fbi.binarize.sign_only) refuses it at preflight."""
    from fbi.binarize import SCHEMES
    from fbi.binarize.fp import DenseLinear
    from fbi.binarize.packing import sign_ste

    class Liar(DenseLinear):
        SIGN_ONLY = True

        def weight_formula(self, weight):
            return sign_ste(weight) * weight.detach().abs().mean()

    monkeypatch.setitem(SCHEMES, "liar", Liar)
    run_dir = tmp_path / "run"
    route = ["zero=stage3", "zero.gather_signs=true", "scheme=onebit_fold"]
    cfg = compose(tiny(run_dir, *route))
    cfg.scheme.name = "liar"  # as if registered declaring SIGN_ONLY: validation trusts that
    with pytest.raises(ConfigError, match="zero.gather_signs: scheme=liar declares SIGN_ONLY"):
        preflight(cfg, 1)
    assert not run_dir.exists()
    preflight(compose(tiny(run_dir, *route)), 1)  # a true declaration passes


def test_a_run_dir_the_user_cannot_write_is_refused_naming_its_owner_and_the_fix():
    """Docker's ``-v /scratch/runs:/runs`` as the image's uid 1001: the mounted folder keeps
    its host owner. Checked as a real unprivileged user (nobody, uid 65534), since root
    writes anywhere; without Docker, which does not run here."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    host = Path(tempfile.mkdtemp(prefix="fbi-mount-"))
    try:
        host.chmod(0o755)  # root's, as a host folder is its owner's
        shared = host / "shared"
        shared.mkdir(mode=0o777)
        shared.chmod(0o1777)
        # fbi is imported as root, then the process becomes nobody: the checkout (CI's is
        # in a mode-0700 temporary folder) need not be readable by nobody.
        probe = ("import os, sys; from pathlib import Path; from fbi.preflight import check_writable\n"
                 "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
                 "check_writable(Path(sys.argv[1]))")
        as_nobody = [sys.executable, "-c", probe]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        refused = subprocess.run(as_nobody + [str(host / "runs" / "fbi130m")], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert (f"run_dir: {host}/runs/fbi130m cannot be written: {host} belongs to uid 0 gid 0 "
                "(drwxr-xr-x) and this process runs as uid 65534 gid 65534") in refused.stderr
        assert 'docker run --user "$(id -u):$(id -g)"' in refused.stderr
        allowed = subprocess.run(as_nobody + [str(shared / "run")], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert allowed.returncode == 0, allowed.stderr
    finally:
        shutil.rmtree(host)
