"""METEOR 1.5, the official METEOR of GLGE's QG tasks (squadqg, msqg): their scripts score with coco-caption, which
runs the METEOR 1.5 jar (English, `-norm`, with its paraphrase table) and reports its corpus-level score.

The jar and its data come from PyPI's pycocoevalcap (the `meteor` extra of setup.cfg); Java from the system
(`make test` installs Debian's default-jre-headless where `java` is missing). Nothing is downloaded at run time.
Where either is missing, `unavailable_reason()` says which and how to get it, and the metric is reported as
unavailable (None with that note), never as 0.

The jar's -stdio protocol: a line `SCORE ||| ref 1 ||| ... ||| ref n ||| hypothesis` answers with one line of
sufficient statistics; `EVAL ||| stats 1 ||| ... ||| stats N` answers with N segment scores, then the corpus score
(computed from the summed statistics, not the mean of the segment scores).
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

JAR_NAME = "meteor-1.5.jar"
# coco-caption's command line, plus a fixed encoding: Java's default charset follows the locale (ASCII in a bare
# container), which would turn every non-ASCII character into '?'.
JAVA_ARGS = ["-Dfile.encoding=UTF-8", "-Xmx2G", "-jar", JAR_NAME, "-", "-", "-stdio", "-l", "en", "-norm"]
INSTALL_JAR = "pip install -c constraints.txt -e '.[meteor]' (PyPI's pycocoevalcap ships the jar)"
INSTALL_JAVA = "make java (Debian/Ubuntu: apt-get install default-jre-headless)"


def jar_path() -> Path | None:
    """pycocoevalcap's meteor-1.5.jar (its paraphrase data sits beside it in data/), or None."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:  # a namespace package: no __init__.py
        jar = Path(root) / "meteor" / JAR_NAME
        if jar.is_file() and (jar.parent / "data" / "paraphrase-en.gz").is_file():
            return jar
    return None


def unavailable_reason() -> str | None:
    """None when METEOR 1.5 can run here, else what is missing and how to install it."""
    if jar_path() is None:
        return f"METEOR unavailable: the METEOR 1.5 jar is not installed; {INSTALL_JAR}"
    if shutil.which("java") is None:
        return f"METEOR unavailable: Java is not installed (no `java` on PATH) to run the METEOR 1.5 jar; {INSTALL_JAVA}"
    return None


def _field(text: str) -> str:
    """One field of a protocol line: no field separator, no line break (coco-caption strips '|||' from
    hypotheses; a reference holding one would shift the fields as well)."""
    return " ".join(text.replace("|||", "").split())


def corpus_meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR 1.5 x100 (what coco-caption reports), see meteor_1_5."""
    return meteor_1_5(hypotheses, references)[0]


def meteor_1_5(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus score, segment scores), x100, of whitespace-tokenized hypotheses, each against its references, from
    one run of the jar (call only when unavailable_reason() is None). RuntimeError with the jar's output if it
    fails."""
    if len(hypotheses) != len(references):
        raise ValueError(f"METEOR: {len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("METEOR: nothing to score (0 hypotheses)")
    jar = jar_path()
    score_lines = [" ||| ".join(["SCORE", *(_field(r) for r in refs), _field(hyp)]) + "\n"
                   for hyp, refs in zip(hypotheses, references)]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(["java", *JAVA_ARGS], cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, encoding="utf-8")
        try:
            # A writer thread: the jar answers each line, and unread answers would fill the pipe and stall it.
            writer = threading.Thread(target=_write_lines, args=(proc, score_lines), daemon=True)
            writer.start()
            stats = [_read_line(proc, stderr) for _ in score_lines]
            writer.join()
            proc.stdin.write(" ||| ".join(["EVAL", *stats]) + "\n")
            proc.stdin.flush()
            segments = [100.0 * float(_read_line(proc, stderr)) for _ in score_lines]
            corpus = 100.0 * float(_read_line(proc, stderr))
        finally:
            proc.kill()
            proc.wait()
    return corpus, segments


def _write_lines(proc: subprocess.Popen, lines: list[str]) -> None:
    try:
        for line in lines:
            proc.stdin.write(line)
        proc.stdin.flush()
    except (BrokenPipeError, OSError):  # the jar died; the reader reports it with the jar's output
        pass


def _read_line(proc: subprocess.Popen, stderr) -> str:
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        stderr.seek(0)
        tail = stderr.read().decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"METEOR 1.5 jar stopped (exit code {proc.returncode}) before answering:\n{tail}")
    return line.strip()
