"""The tuning progress bar of `tvm-qmfrg compile`."""

import io

from tvm_qmfrg.targets.tune import TuneProgress

from tvm_qmfrg.cli import _ProgressBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_redraws_in_place_on_a_terminal_and_breaks_between_tasks():
    out = Terminal()
    bar = _ProgressBar(out, width=10)
    bar(TuneProgress(1, 2, "fused_conv2d", 16, 64, None))
    bar(TuneProgress(1, 2, "fused_conv2d", 64, 64, 0.25))
    bar(TuneProgress(2, 2, "fused_matmul", 32, 64, 0.5))
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    assert "task 1/2 [##########] 64/64 trials, best 0.2500 ms  fused_conv2d\n" in text
    assert "task 2/2 [#####.....] 32/64 trials, best 0.5000 ms" in text
    assert "[##........] 16/64 trials, best -" in text


def test_bar_prints_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = _ProgressBar(out, width=4)
    bar(TuneProgress(1, 1, "t", 2, 4, None))
    bar.close()
    assert out.getvalue() == "task 1/1 [##..] 2/4 trials, best -  t\n"
