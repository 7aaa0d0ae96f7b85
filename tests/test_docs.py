"""The documentation's commands cannot rot: every shell block of README.md and docs/*.md is
read and each command checked as written, without training or running anything heavy.

- a ``train.py`` command (under python, torchrun, the deepspeed launcher, ``sbatch`` or a
  launch script, ``docker run``), ``python -m fbi.distill.cache_writer`` and
  ``data/shakespeare/prepare.py``: the configuration is composed and validated as train.py
  does (Hydra, ``check_experiment``, ``fbi.configure.validate``) and the global batch is split
  at the world size the command names;
- ``python -m fbi ...``, ``python -m fbi.<module>`` and ``bench/`` scripts: the arguments are
  parsed by the command's own parser (tests/docs_parse.py, one process for all), and the
  Hydra overrides it hands on are composed;
- a ``console`` block's ``$`` command followed by an error must be refused with that message
  (``...`` in the message matches anything);
- every relative link (with its ``#anchor``) resolves, every repository path a page names in
  backticks exists, and every ``fbi.module.name`` it names is defined.

A literal ``...`` argument stands for what the page elides: fields the configuration then
lacks (``teacher.path``, ``data.shards_dir``) are filled with placeholders. A block the check
cannot handle is preceded by ``<!-- docs-test: skip REASON -->``.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL = {"bash", "sh", "shell", "console"}
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->")
# Entry points that take train.py's Hydra overrides and nothing else.
HYDRA_SCRIPTS = {"train.py", "data/shakespeare/prepare.py"}
HYDRA_MODULES = {"fbi.distill.cache_writer"}
# Launch scripts: how many positional arguments come before train.py's overrides.
LAUNCHERS = {"launch/slurm/train.sbatch": 0, "launch/slurm/prepare_data.sbatch": 0,
             "launch/torchrun_hosts.sh": 1, "launch/deepspeed_hostfile.sh": 1,
             "launch/torchrun_node.sh": 0}
# Options of torchrun and the deepspeed launcher that take no value.
FLAGS = {"--standalone", "--no_python", "--no-python", "--no_local_rank", "--no_ssh",
         "--run_path", "--run-path"}
# What a page's "..." may leave out, filled in when the configuration asks for it.
# (the field a refusal names -> the override that fills it)
PLACEHOLDERS = {"teacher.path": "teacher.path=/placeholder/teacher",
                "data": "data.shards_dir=/placeholder/shards"}
FILE_SUFFIXES = {"sif", "json", "jsonl", "yaml", "py", "md", "txt", "log", "pt", "png", "bin"}
REPO_PATH = re.compile(r"^(fbi|bench|conf|launch|tests|data|docs|\.ci)/[\w./-]*$|"
                       r"^(train\.py|setup\.sh|Dockerfile|pyproject\.toml|requirements(-\w+)?\.txt)$")


@dataclass
class Command:
    page: str
    line: int
    argv: list[str]
    expect_error: str | None = None  # a console block's printed error: must be refused so

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


def blocks(text: str):
    """(first line number, language, lines, skip reason or None) of every fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(before)
        start, i = i + 1, i + 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            i += 1
        yield start + 1, fence.group(1).lower(), lines[start:i], skip.group(1).strip() if skip else None
        i += 1


def prose(text: str) -> list[tuple[int, str]]:
    """Numbered lines outside fenced blocks."""
    out, inside = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(r"^\s*```", line):
            inside = not inside
        elif not inside:
            out.append((n, line))
    return out


def commands(page: str, first: int, lang: str, lines: list[str]) -> list[Command]:
    """The commands of a shell block: continuations joined, comments dropped, ``&&``/``;``
    chains split; in a console block only ``$`` lines, with the error printed after them."""
    out: list[Command] = []
    joined: list[tuple[int, str, list[str]]] = []  # (line, command text, output lines)
    n = 0
    while n < len(lines):
        line, start = lines[n], first + n
        if lang == "console":
            if not line.startswith("$ "):
                if joined:
                    joined[-1][2].append(line)
                n += 1
                continue
            line = line[2:]
        while line.rstrip().endswith("\\") and n + 1 < len(lines):
            n += 1
            line = line.rstrip()[:-1] + " " + lines[n].strip()
        joined.append((start, line, []))
        n += 1
    for start, text, output in joined:
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError as err:
            out.append(Command(page, start, ["<unparsable>", str(err)]))
            continue
        expect = next((m.group(1) for o in output if (m := re.search(r"Error: (.*)", o))), None)
        part: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", "||", ";", "|", "&"):
                if part:
                    out.append(Command(page, start, part, expect))
                part = []
            else:
                part.append(token)
    return out


def split_launcher(argv: list[str]) -> tuple[int | None, list[str]]:
    """(world size or None, the rest from the program on) of a torchrun/deepspeed line."""
    opts: dict[str, str] = {}
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        key, _, value = argv[i].partition("=")
        if not value and key not in FLAGS and i + 1 < len(argv):
            i += 1
            value = argv[i]
        opts[key] = value
        i += 1
    rest = argv[i:]
    try:
        if argv[0] == "torchrun":
            nodes = opts.get("--nnodes", "1")
            return int(opts.get("--nproc_per_node", "1")) * int(nodes), rest
        if "--hostfile" in opts:
            return None, rest
        return int(opts.get("--num_gpus", "1")) * int(opts.get("--num_nodes", "1")), rest
    except ValueError:  # "--nnodes 1:4", "--nproc_per_node gpu": no fixed world size
        return None, rest


class Checker:
    """Collects what to compose and what to parse, then checks them in two batches."""

    def __init__(self, root: Path, repo: Path):
        self.root, self.repo = root.resolve(), repo
        self.problems: list[str] = []
        self.compose_jobs: list[tuple[Command, list[str], int | None]] = []
        # (command, job, None or the world size to compose the overrides it hands on at)
        self.parse_jobs: list[tuple[Command, dict, int | None]] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    # --- commands -------------------------------------------------------------------
    def command(self, cmd: Command) -> None:
        argv = list(cmd.argv)
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # FOO=1 python ...
            argv.pop(0)
        if not argv:
            return
        self.paths(cmd.where, argv)
        head = argv[0]
        if head == "<unparsable>":
            return self.problem(cmd.where, f"cannot split the command: {argv[1]}")
        if head in ("bash", "sh") and len(argv) > 1:
            return self.program(cmd, None, argv[1:])
        if head == "sbatch":
            rest = argv[1:]
            while rest and rest[0].startswith("-"):
                rest.pop(0)
            return self.program(cmd, None, rest)
        if head in ("torchrun", "deepspeed"):
            world, rest = split_launcher(argv)
            if rest[:1] == ["-m"]:
                return self.module(cmd, rest[1], rest[2:], world)
            return self.program(cmd, world, rest)
        if head == "docker" and "train.py" in argv:  # docker run ... --entrypoint torchrun ...
            at = argv.index("train.py")
            nproc = argv[argv.index("--nproc_per_node") + 1] if "--nproc_per_node" in argv[:at] else "1"
            return self.program(cmd, int(nproc), argv[at:])
        if Path(head).name.startswith("python"):
            if argv[1:2] == ["-m"] and len(argv) > 2:
                return self.module(cmd, argv[2], argv[3:], 1)
            return self.program(cmd, 1, argv[1:])
        if head in LAUNCHERS or head.startswith((".ci/", "launch/", "bench/")):
            return self.program(cmd, None, argv)

    def program(self, cmd: Command, world: int | None, argv: list[str]) -> None:
        if not argv:
            return
        script, args = argv[0], argv[1:]
        if REPO_PATH.match(script) and not (self.repo / script).exists():
            return  # reported by paths()
        if script in HYDRA_SCRIPTS:
            args = [a for a in args if a not in ("-m", "--multirun")]
            self.compose_jobs.append((cmd, args, world if script == "train.py" else 1))
        elif script in LAUNCHERS:
            self.compose_jobs.append((cmd, args[LAUNCHERS[script]:], None))
        elif script.startswith("bench/") and script.endswith(".py"):
            self.parse_jobs.append((cmd, {"module": None, "path": script, "argv": args}, None))

    def module(self, cmd: Command, name: str, args: list[str], world: int | None) -> None:
        if name in HYDRA_MODULES:  # the cache writer splits parts, not batches, over ranks
            self.compose_jobs.append((cmd, args, None))
        elif name == "fbi" or name.startswith("fbi."):
            module = "fbi.cli" if name == "fbi" else name
            if self.module_file(module) is None:
                return self.problem(cmd.where, f"python -m {name}: no such module")
            world = None
            if name == "fbi.estimate":  # it splits the batch at --world-size, as a run would
                world = int(args[args.index("--world-size") + 1]) if "--world-size" in args else 1
            elif args[:2] == ["data", "prepare"]:
                world = 0  # workers, not a batch
            job = {"module": "fbi" if name == "fbi" else name, "path": None, "argv": args}
            self.parse_jobs.append((cmd, job, world))

    # --- names ----------------------------------------------------------------------
    def paths(self, where: str, tokens: list[str]) -> None:
        for token in tokens:
            token = token.rstrip(".,;:)")
            if (REPO_PATH.match(token) and not re.search(r"[<*{]|\b[A-Z]{2,}\b", token)
                    and not (self.repo / token).exists()):
                self.problem(where, f"`{token}` names a file or folder that does not exist")

    def module_file(self, dotted: str) -> Path | None:
        base = self.repo / Path(*dotted.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.exists():
                return candidate
        return None

    def dotted(self, where: str, name: str) -> None:
        """``fbi.a.b`` is a module, or ``fbi.a.b`` a module and ``c`` defined in it."""
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            found = self.module_file(".".join(parts[:cut]))
            if found is None:
                continue
            if cut < len(parts) and parts[cut] not in defined(found):
                self.problem(where, f"`{name}`: {'.'.join(parts[:cut])} defines no {parts[cut]}")
            return
        self.problem(where, f"`{name}` names no module of fbi")

    def link(self, page: Path, where: str, target: str) -> None:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page.resolve()
        try:
            rel = file.relative_to(self.root)
        except ValueError:
            return self.problem(where, f"link {target} leaves the repository")
        found = next((c for c in (self.root / rel, self.repo / rel) if c.exists()), None)
        if found is None:
            return self.problem(where, f"link {target}: {rel} does not exist")
        if anchor and found.suffix == ".md" and anchor not in anchors(found.read_text()):
            self.problem(where, f"link {target}: {rel} has no heading #{anchor}")

    def page(self, page: Path) -> None:
        text = page.read_text()
        name = page.relative_to(self.root).as_posix()
        for first, lang, lines, skip in blocks(text):
            if skip:
                continue
            if lang in SHELL:
                for cmd in commands(name, first, lang, lines):
                    self.command(cmd)
            else:  # a layout tree, an excerpt: the repository paths it names
                for n, line in enumerate(lines, first):
                    self.paths(f"{name}:{n}", line.split())
        for n, line in prose(text):
            where = f"{name}:{n}"
            for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", line):
                if not re.match(r"^[a-z]+:", target):
                    self.link(page, where, target)
            for code in re.findall(r"`([^`]+)`", line):
                self.paths(where, code.split())
                for name_ in re.findall(r"(?<![\w./-])(fbi(?:\.[A-Za-z_]\w*)+)", code):
                    if name_.rsplit(".", 1)[1] not in FILE_SUFFIXES:  # fbi.sif is a file
                        self.dotted(where, name_)

    # --- the two batches ------------------------------------------------------------
    def compose_all(self) -> None:
        """Compose (and validate) every compose job so far, as train.py would."""
        from hydra import compose, initialize_config_dir
        from hydra.core.hydra_config import HydraConfig

        from fbi.config import CONF_DIR, check_experiment, register
        from fbi.configure import validate

        register()
        jobs, self.compose_jobs = self.compose_jobs, []
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            for cmd, args, world in jobs:
                elided = "..." in args
                overrides = [first_of_sweep(a) for a in args if a != "..."]
                error = None
                for _ in range(len(PLACEHOLDERS) + 1):
                    try:
                        cfg = compose("train", overrides=overrides, return_hydra_config=True)
                        HydraConfig.instance().set_config(cfg)
                        check_experiment(CONF_DIR, dict(cfg.hydra.runtime.choices), overrides)
                        checked = validate(cfg)
                        if world:
                            checked.grad_accum_steps(world)
                        error = None
                    except Exception as err:  # noqa: BLE001  (Hydra's and fbi's refusals alike)
                        error = f"{type(err).__name__}: {err}".replace("\n", " ")[:400]
                    fill = next((v for k, v in PLACEHOLDERS.items()
                                 if error and elided and f"ConfigError: {k}" in error), None)
                    if fill is None:
                        break
                    overrides.append(fill)
                self.outcome(cmd, error, " ".join(args))

    def start_parsing(self) -> subprocess.Popen | None:
        """tests/docs_parse.py on every parse job, in the background while composing."""
        if not self.parse_jobs:
            return None
        jobs = tempfile.TemporaryFile("w+")
        json.dump([job for _, job, _ in self.parse_jobs], jobs)
        jobs.seek(0)
        # Files, not pipes: nothing blocks on a full pipe while this process composes.
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        with jobs:
            return subprocess.Popen([sys.executable, str(REPO / "tests" / "docs_parse.py")],
                                    cwd=REPO, text=True, stdin=jobs, stdout=self.out, stderr=self.err)

    def parsed(self, proc: subprocess.Popen | None) -> None:
        """Read the parse results; the Hydra overrides a command hands on become compose jobs."""
        if proc is None:
            return
        code = proc.wait(timeout=300)
        with self.out, self.err:
            self.out.seek(0)
            self.err.seek(0)
            stdout, stderr = self.out.read(), self.err.read()
        if code != 0:
            raise AssertionError(f"tests/docs_parse.py failed:\n{stderr[-3000:]}")
        results = json.loads(stdout.strip().splitlines()[-1])
        for (cmd, job, world), result in zip(self.parse_jobs, results):
            if not result["ok"]:
                self.outcome(cmd, result["error"], " ".join(job["argv"]))
            elif world is not None:
                self.compose_jobs.append((cmd, result["extras"], world))
            elif result["extras"]:
                self.problem(cmd.where, f"unrecognized arguments {result['extras']}")

    def outcome(self, cmd: Command, error: str | None, what: str) -> None:
        if cmd.expect_error is None:
            if error:
                self.problem(cmd.where, f"`{shlex.join(cmd.argv)}` fails: {error}")
        elif error is None:
            self.problem(cmd.where, f"`{what}` is no longer refused ({cmd.expect_error})")
        else:
            pattern = ".*".join(re.escape(p) for p in re.split(r"\(?\.\.\.\)?", cmd.expect_error))
            if not re.search(pattern, error):
                self.problem(cmd.where, f"refused otherwise than the page shows: {error}")


def first_of_sweep(override: str) -> str:
    """``optim.lr=1e-4,3e-4`` (a multirun sweep) -> its first value, for composing."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(override)
    if not parsed.is_sweep_override():
        return override
    return f"{parsed.get_key_element()}={next(parsed.sweep_string_iterator())}"


def defined(module: Path) -> set[str]:
    """Top-level names of a module: definitions, assignments, imports."""
    names: set[str] = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if module.name == "__init__.py":
        names.update(p.stem for p in module.parent.iterdir() if p.suffix == ".py" or p.is_dir())
    return names


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose(text):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def check_docs(root: Path, repo: Path = REPO) -> list[str]:
    """Problems of README.md and docs/*.md under ``root`` ("page:line: what"), none if all
    their commands, links and names hold; repository paths are looked up in ``repo``."""
    checker = Checker(root, repo)
    for page in pages(root):
        checker.page(page)
    parsing = checker.start_parsing()
    checker.compose_all()
    checker.parsed(parsing)
    checker.compose_all()
    return sorted(checker.problems, key=lambda p: (p.split(":")[0], int(p.split(":")[1])))


def test_every_documented_command_link_and_path_holds():
    problems = check_docs(REPO)
    assert not problems, "\n".join(problems)


def test_a_broken_command_in_a_copy_is_reported_with_its_page_and_line(tmp_path):
    (tmp_path / "docs").mkdir()
    page = (REPO / "docs" / "teacher.md").read_text()
    good = "python train.py experiment=demo teacher=cache run_dir=runs/demo_cache"
    assert good in page
    (tmp_path / "docs" / "teacher.md").write_text(page.replace(good, good.replace("run_dir", "run_dr")))
    line = 1 + page[:page.index(good)].count("\n")
    problems = check_docs(tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"docs/teacher.md:{line}: ") and "run_dr" in problems[0]


def test_a_wrong_flag_link_and_path_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\nSee [the teacher](teacher.md#no-such-heading) and `bench/no_such.py`.\n\n"
        "```bash\npython -m fbi export runs/demo --formt packed --out x\n"
        "python bench/packed_size.py --model fbi_130m --vocab 32000\n```\n"
        "```console\n$ python train.py model=fbi_130m\n"
        "fbi.config.ConfigError: model: model=fbi_130m was named, but (...) not this\n```\n"
        "<!-- docs-test: skip a block the check is told to leave alone -->\n"
        "```bash\npython train.py no_such_field=1\n```\n")
    problems = check_docs(tmp_path)
    assert len(problems) == 4, problems
    assert problems[0].startswith("docs/page.md:3: link teacher.md#no-such-heading")
    assert problems[1].startswith("docs/page.md:3: `bench/no_such.py`")
    assert problems[2].startswith("docs/page.md:6: ") and "--formt" in problems[2]
    assert problems[3].startswith("docs/page.md:10: refused otherwise")


def test_commands_are_split_as_a_shell_reads_them_and_sent_to_the_right_check():
    block = ["OMP_NUM_THREADS=1 torchrun --nnodes 2 --nproc_per_node 4 train.py \\",
             "    zero=stage2 micro_batch_size=2   # a comment",
             "bash setup.sh && .venv/bin/python train.py experiment=demo",
             "sbatch --nodes=4 launch/slurm/train.sbatch experiment=fbi_130m ...",
             "deepspeed --num_gpus 2 --no_local_rank train.py zero=stage1",
             "python -m fbi export runs/demo --format hf --out x",
             "docker run --gpus all --entrypoint torchrun fbi --nproc_per_node 8 train.py seed=1"]
    checker = Checker(REPO, REPO)
    for cmd in commands("p.md", 10, "bash", block):
        checker.command(cmd)
    assert [(c.line, args, world) for c, args, world in checker.compose_jobs] == [
        (10, ["zero=stage2", "micro_batch_size=2"], 8),
        (12, ["experiment=demo"], 1),
        (13, ["experiment=fbi_130m", "..."], None),
        (14, ["zero=stage1"], 2),
        (16, ["seed=1"], 8)]
    assert [(c.line, job) for c, job, _ in checker.parse_jobs] == [
        (15, {"module": "fbi", "path": None,
              "argv": ["export", "runs/demo", "--format", "hf", "--out", "x"]})]
    assert not checker.problems
