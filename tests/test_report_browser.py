"""The report page in a real browser: headless Chromium loads report.html and every plot
decodes to an image with a size (skips where no Chromium is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from common import experiment_dict, fake_run
from conftest import make_tiny_model

from factedit.lab import run_experiment
from factedit.report import compare_runs, write_report

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)

# Appended to a copy of the page: after load, record each image's decoded width.
PROBE = """<script>window.addEventListener('load', () => {
  for (const img of document.images) img.setAttribute('data-width', img.naturalWidth);
  document.body.setAttribute('data-probed', document.images.length);
});</script>"""


@pytest.mark.skipif(BROWSER is None, reason="no chromium on this machine (.ci/run installs "
                                            "Debian's chromium; apt-get install chromium)")
def test_every_plot_renders_in_headless_chromium(lab_env, tokenizer, tmp_path):  # noqa: F811
    tmp, corpus, dataset = lab_env
    out = run_experiment(experiment_dict(corpus, dataset, eval={"every": 1}), tmp / "run",
                         model=make_tiny_model(tokenizer), progress=False)
    report = write_report(out)
    assert_plots_render(report.html, len(report.plots), tmp_path)


@pytest.mark.skipif(BROWSER is None, reason="no chromium on this machine (.ci/run installs "
                                            "Debian's chromium; apt-get install chromium)")
def test_every_plot_of_a_comparison_renders_in_headless_chromium(tmp_path):
    runs = [fake_run(tmp_path / "tf", "mqd-tf", "true_false", 1.0, 0.29, 1.5),
            fake_run(tmp_path / "gen", "mqd-gen", "generated", 0.9, 0.21, 400.0)]
    comparison = compare_runs(runs, tmp_path / "cmp")
    assert_plots_render(comparison.html, len(comparison.plots), tmp_path)


def assert_plots_render(html_page, n_plots, tmp_path):
    page = tmp_path / "probe.html"
    page.write_text(html_page.read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f'data-probed="{n_plots}"' in dom, dom[-2000:]
    widths = [int(w) for w in re.findall(r'data-width="(\d+)"', dom)]
    assert len(widths) == n_plots and all(w > 100 for w in widths), widths
