"""What the commands print while they work (configs/progress.py, the engine's log lines, model/__init__.py):

  * off a terminal, a progress display is a plain line at each tenth of the work, with the rate and the time left
    (counted here; a real `generate` run is counted in tests/test_portable.py);
  * on a terminal the bar is drawn on stderr, and a log line written through the bar (the engine's `log_line`,
    which carries the evaluation lines during training) wipes it first instead of landing on the bar's line:
    checked on a real pseudo-terminal, in a child process that draws a bar and logs through Engine.log_line;
  * TANDEM_PROGRESS=off in the environment switches every display off;
  * megatron-core's "Transformer Engine and Apex are not installed" warnings are gone from a process that
    imports the model and the training core, and other warnings still show.
"""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

from configs import progress

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TERM="xterm",
           PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
LINE = re.compile(r"^\[(?P<desc>[^\]]+)\] (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\), "
                  r"(?P<rate>[0-9.e+]+) \w+/s, (?P<tail>eta \d+s|\d+s)$")


def test_off_a_terminal_a_line_at_each_tenth_with_rate_and_eta():
    out = io.StringIO()  # not a terminal
    with progress.bar(200, desc="shard", unit="file", file=out) as shown:
        for _ in range(200):
            shown.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m["n"]) for m in parsed] == list(range(20, 201, 20))
    assert [int(m["pct"]) for m in parsed] == list(range(10, 101, 10))
    assert all(m["tail"].startswith("eta") for m in parsed[:-1]) and not parsed[-1]["tail"].startswith("eta")
    assert all(m["desc"] == "shard" and m["unit"] == "file" and float(m["rate"]) > 0 for m in parsed)

    # updates of several units; an unknown total shows the count and the rate, at the end only here (< 30 s)
    out = io.StringIO()
    with progress.bar(20, desc="generate ar_beam", unit="ex", file=out) as shown:
        for _ in range(7):
            shown.update(3)  # 21 > 20: the last batch may overshoot a rounded total
    assert [line.split("] ")[1].split(" (")[0] for line in out.getvalue().splitlines()] == \
        ["3/20 ex", "6/20 ex", "9/20 ex", "12/20 ex", "15/20 ex", "18/20 ex", "21/20 ex"]
    out = io.StringIO()
    with progress.bar(desc="extract dump.xml", unit="page", file=out) as shown:
        shown.update(512)
        shown.update(512)
    assert re.fullmatch(r"\[extract dump.xml\] 1024 page, [0-9.e+]+ page/s\n", out.getvalue())


def test_iterate_counts_items_and_silenced_shows_nothing(capsys):
    assert list(progress.iterate(range(5), desc="tasks", unit="pair")) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("[tasks] 5/5 pair (100%)")
    with progress.silenced():
        assert sum(progress.iterate(range(50), desc="rouge", unit="ex")) == 1225
        with progress.bar(10, desc="generate", unit="ex") as shown:
            shown.update(10)
    assert capsys.readouterr() == ("", "")
    assert isinstance(progress.bar(10, desc="x", enabled=False), progress.Silent)


def test_tandem_progress_off_switches_every_display_off(monkeypatch, capsys):
    for value, shown in (("off", 0), ("0", 0), ("FALSE", 0), ("on", 3), ("", 3)):
        monkeypatch.setenv(progress.SWITCH, value)
        assert list(progress.iterate(range(3), desc="extract", unit="file")) == [0, 1, 2]
        assert len(capsys.readouterr().err.splitlines()) == shown, value


def child(log_line: str, setup: str = "pass") -> str:
    """A program that runs `setup` (imports: what they print comes before the bar), then draws a bar of 8 steps and
    logs a line after step 4 with `log_line`."""
    return textwrap.dedent(f"""
        import time
        from types import SimpleNamespace

        from configs import progress

        {setup}
        with progress.bar(8, desc="pretrain", unit="step") as bar:
            for step in range(1, 9):
                time.sleep(0.02)
                bar.update(1)
                if step == 4:
                    {log_line}
    """)


# The engine's own log_line (evaluation and checkpoint lines during training), called as rank 0 of a pretraining run.
ENGINE = "from pretrain.core.engine import Engine"
ENGINE_LOG = "Engine.log_line(SimpleNamespace(rank0=True, kind='pretrain'), 'eval at step 4: loss 1.2345')"


def run_on_terminal(code: str, stdout_too: bool) -> tuple[str, str]:
    """Run `code` with stderr (and stdout_too: stdout as well) on a pseudo-terminal; (terminal text, piped stdout)."""
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=ENV, stdin=subprocess.DEVNULL,
                            stdout=secondary if stdout_too else subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        ready, _, _ = select.select([main], [], [], 300)
        if not ready:
            proc.kill()
            raise AssertionError("the child printed nothing for 300 s")
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    piped = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.wait(timeout=60) == 0
    os.close(main)
    return b"".join(chunks).decode(), piped


def visible(line: str) -> str:
    """What a terminal shows of one line: the text after its last carriage return."""
    return line.rstrip("\r").rsplit("\r", 1)[-1]


def test_bar_on_stderr_and_log_lines_through_it():
    terminal, piped = run_on_terminal(child("progress.write('[pretrain] eval at step 4: loss 1.2345')"), False)
    assert piped == "[pretrain] eval at step 4: loss 1.2345\n"  # stdout holds the log line and nothing of the bar
    assert "8/8" in terminal and "step/s" in terminal and "eval at step" not in terminal

    terminal, _ = run_on_terminal(child(ENGINE_LOG, setup=ENGINE), True)  # one terminal, as in an interactive shell
    lines = terminal.split("\n")
    logged = [line for line in lines if "eval at step 4" in line]
    assert len(logged) == 1 and visible(logged[0]) == "[pretrain] eval at step 4: loss 1.2345", logged
    assert "8/8" in visible(lines[-1] or lines[-2])  # the bar is drawn again below the line and finishes


def test_megatron_import_warnings_are_filtered_and_others_shown():
    code = ("import warnings; import pretrain.core.distributed, model.seq2seq, model.generation, finetune.decoding; "
            "warnings.warn('another warning still shows', UserWarning)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Transformer Engine and Apex are not installed" not in output, output
    assert "UserWarning: another warning still shows" in proc.stderr
