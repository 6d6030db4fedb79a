"""`edgessl select`: the rules on features of known shape, the CSV and its page (driven in headless
Chromium), and `edgessl finetune --labels` on exactly the labelled images."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from edgessl.errors import EdgesslError
from edgessl import selection
from edgessl.selection import diffusion_kernel, kernel_width, kmeans, pick, read_paths, typicality
from conftest import tiny_config

SIZES = (40, 30, 20, 12, 8)  # five blobs of unequal size, largest first


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Five tight, well-apart blobs on the sphere, and each row's blob."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:5] * 10
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(SIZES)])
    x = centres[y] + 0.3 * torch.randn(len(y), 8, generator=g)
    return F.normalize(x, dim=1), y


def test_typicality_matches_a_naive_loop():
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
    want = []
    for i in range(12):
        d = sorted(float((x[i] - x[j]).norm()) for j in range(12) if j != i)
        want.append(1.0 / (sum(d[:4]) / 4 + 1e-8))
    torch.testing.assert_close(typicality(x, k=4), torch.tensor(want), rtol=1e-5, atol=0)
    assert typicality(x[:1]).tolist() == [0.0]  # a lone image has no neighbours


def test_kmeans_finds_well_apart_blobs():
    x, y = blobs()
    _, assign = kmeans(x, 5, torch.Generator().manual_seed(0))
    for c in range(5):  # each blob is one cluster, and no two blobs share one
        assert len(assign[y == c].unique()) == 1
    assert len(assign.unique()) == 5


@pytest.mark.parametrize("rule", ["typical", "kmeans", "graph", "herding", "coverage"])
def test_each_rule_picks_every_blob_once(rule):
    x, y = blobs()
    picks = pick(x, 5, rule)
    assert sorted(y[picks].tolist()) == [0, 1, 2, 3, 4]
    if rule != "coverage":  # priority: the largest cluster first
        assert y[picks].tolist() == [0, 1, 2, 3, 4]


def test_typical_picks_the_densest_image_of_each_cluster():
    x, y = blobs()
    picks = pick(x, 5, "typical")
    for i in picks:
        members = (y == y[i]).nonzero().flatten()
        assert i == int(members[typicality(x[members]).argmax()])


@pytest.mark.parametrize("rule", ["typical", "kmeans", "graph", "herding", "coverage", "random"])
def test_a_second_round_leaves_the_labelled_out_and_goes_where_they_are_not(rule):
    x, y = blobs()
    labelled = (y <= 1).nonzero().flatten()[::3].tolist()  # blobs 0 and 1 hold labels already
    picks = pick(x, 3, rule, labelled=labelled)
    assert not set(picks) & set(labelled) and len(set(picks)) == 3
    if rule != "random":
        assert sorted(y[picks].tolist()) == [2, 3, 4]


def naive_greedy(k: torch.Tensor, budget: int, labelled: list[int]) -> list[int]:
    """Each step: the image that most raises the sum over all images of the best kernel value to a pick."""
    picks = []
    for _ in range(budget):
        free = [j for j in range(len(k)) if j not in labelled + picks]
        picks.append(max(free, key=lambda j: float(k[labelled + picks + [j]].max(0).values.sum())))
    return picks


def test_herding_matches_a_naive_greedy_of_the_coverage_it_maximises():
    x = F.normalize(torch.randn(60, 6, generator=torch.Generator().manual_seed(2)), dim=1)
    d = torch.cdist(x, x).double()
    sigma = float(d.sort(1).values[:, 20].median())  # each row's 20th nearest other row (index 0: itself)
    assert kernel_width(x, torch.Generator()) == pytest.approx(sigma, rel=1e-5)
    k = torch.exp(-d.pow(2) / (2 * sigma**2))
    assert pick(x, 12, "herding", labelled=[7, 33]) == naive_greedy(k, 12, [7, 33])


def test_graph_matches_a_naive_greedy_under_a_naive_diffusion_of_the_knn_graph():
    x = F.normalize(torch.randn(70, 6, generator=torch.Generator().manual_seed(3)), dim=1).double()
    cos = x @ x.T
    a = torch.zeros(70, 70, dtype=torch.float64)
    for i in range(70):  # each image's 20 most similar others, weighted max(cos, 0)^3
        others = sorted((j for j in range(70) if j != i), key=lambda j: -float(cos[i, j]))[:20]
        a[i, others] = cos[i, others].clamp(min=0) ** 3
    w = a + a.T
    d = w.sum(1).rsqrt()
    s, z, term = d[:, None] * w * d[None], torch.zeros(70, 70, dtype=torch.float64), torch.eye(70, dtype=torch.float64)
    for _ in range(300):  # sum_t alpha^t S^t
        z, term = z + term, selection.DIFFUSION * s @ term
    torch.testing.assert_close(diffusion_kernel(x.float()).double(), z, rtol=1e-4, atol=1e-5)
    picks = pick(x.float(), 10, "graph", labelled=[4, 50])
    assert picks == naive_greedy(z, 10, [4, 50])
    # a greedy is sequential: labelling in two rounds (select --exclude) picks what one round picks
    assert picks[:4] + pick(x.float(), 6, "graph", labelled=[4, 50] + picks[:4]) == picks


def test_graph_above_its_size_limit_picks_from_a_seeded_draw(monkeypatch):
    x, y = blobs()
    monkeypatch.setattr(selection, "GRAPH_ROWS", 60)
    labelled = [0, 1, 2]
    picks = pick(x, 8, "graph", labelled=labelled, seed=1)
    assert picks == pick(x, 8, "graph", labelled=labelled, seed=1) and len(set(picks)) == 8
    assert not set(picks) & set(labelled) and len(set(y[picks].tolist())) >= 4
    assert len({tuple(pick(x, 8, "graph", seed=s)) for s in range(4)}) > 1  # each seed its own draw


def test_random_is_seeded_and_every_image_can_be_picked():
    x, _ = blobs()
    assert pick(x, 10, "random", seed=3) == pick(x, 10, "random", seed=3) != pick(x, 10, "random", seed=4)
    assert sorted(pick(x, len(x), "random")) == list(range(len(x)))


def test_bad_budgets_and_rules_are_one_line():
    x, _ = blobs()
    with pytest.raises(EdgesslError, match="--budget 200 is not between 1 and the 110"):
        pick(x, 200)
    with pytest.raises(EdgesslError, match="--budget 108 is not between 1 and the 107"):
        pick(x, 108, labelled=[0, 1, 2])
    with pytest.raises(EdgesslError, match="unknown selection rule 'best'"):
        pick(x, 3, "best")


def test_a_csv_that_is_not_one_is_named(tmp_path):
    with pytest.raises(EdgesslError, match="no such file"):
        read_paths(tmp_path / "none.csv", "--labels", label=True)
    (tmp_path / "bin.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(EdgesslError, match="is not a CSV"):
        read_paths(tmp_path / "bin.csv", "--labels", label=True)
    (tmp_path / "cols.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(EdgesslError, match="columns path and label .found: file, class"):
        read_paths(tmp_path / "cols.csv", "--labels", label=True)
    (tmp_path / "ok.csv").write_text('path,label\n"a,b.png",cat\nc.png,\n')
    assert read_paths(tmp_path / "ok.csv", "--labels", label=True) == [("a,b.png", "cat")]  # unlabelled: left out


# --- the command, its page and the fine-tune on its labels -------------------------------------------

def edgessl(*args):
    return subprocess.run([sys.executable, "-m", "edgessl", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A tiny pretraining run on a folder of 32 px photos in two classes (one file name with a comma),
    and a flat folder of the same photos without classes, with its own run."""
    from edgessl.train import pretrain

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "labelled" / f"c{c}").mkdir(parents=True)
        for i in range(14):
            img = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8) + np.uint8(120 * c)
            name = f"{i:02d}{',x' if i == 3 else ''}.png"
            Image.fromarray(img).save(root / "labelled" / f"c{c}" / name)
    shutil.copytree(root / "labelled" / "c0", root / "flat")
    for name in ("labelled", "flat"):
        pretrain(tiny_config(f"folder:{root / name}", data={"image_size": 32, "val_fraction": 0.25 if
                                                            name == "labelled" else 0.0}, optim={"epochs": 1}),
                 root / f"run_{name}", log=lambda *_: None)
    return root


def test_select_writes_picks_a_page_and_keeps_the_features(photos, tmp_path):
    run = photos / "run_labelled"
    r = edgessl("select", str(run), "--budget", "4", "--out", str(tmp_path / "picks.csv"), "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    lines = (tmp_path / "picks.csv").read_text().splitlines()
    assert lines[0] == "rank,path" and [ln.split(",")[0] for ln in lines[1:]] == ["1", "2", "3", "4"]
    train_files = {str(p.relative_to(photos / "labelled")) for p in (photos / "labelled").rglob("*.png")}
    assert set(summary["picks"]) <= train_files and len(set(summary["picks"])) == 4 and summary["pool"] == 21
    assert (tmp_path / "picks.html").exists() and not summary["features_cached"]
    assert len(list((run / "features").glob("*.npy"))) == 1
    again = json.loads(edgessl("select", str(run), "--budget", "4", "--out", str(tmp_path / "again.csv"),
                               "--json").stdout.strip().splitlines()[-1])
    assert again["features_cached"] and again["picks"] == summary["picks"]
    more = json.loads(edgessl("select", str(run), "--budget", "5", "--exclude", str(tmp_path / "picks.csv"),
                              "--out", str(tmp_path / "round2.csv"), "--json").stdout.strip().splitlines()[-1])
    assert more["excluded"] == 4 and not set(more["picks"]) & set(summary["picks"])


def test_select_bad_input_is_one_line(photos, tmp_path):
    run = str(photos / "run_labelled")
    (tmp_path / "bad.csv").write_text("path\nnot/there.png\n")
    for args, message in [(["--budget", "0"], "--budget"), (["--budget", "99"], "not between 1 and the 21"),
                          (["--budget", "2", "--exclude", str(tmp_path / "bad.csv")], "'not/there.png' is not one"),
                          (["--budget", "2", "--rule", "best"], "'best' is not one of")]:
        r = edgessl("select", run, *args, "--out", str(tmp_path / "p.csv"))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "p.csv").exists()
    r = edgessl("select", run, "--budget", "2", "--out", str(tmp_path / "p.txt"))
    assert r.returncode == 2 and "--out must end in .csv" in r.stderr


def test_finetune_trains_on_exactly_the_labelled_images(photos, tmp_path):
    import edgessl as api

    run = photos / "run_labelled"
    picks = api.Run(run).select(budget=6)["picks"]
    labels = {p: p.split("/")[0] for p in picks[:5]}  # the sixth left unlabelled, as the page allows
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f'"{p}",{c}\n' for p, c in labels.items()) + f'"{picks[5]}",\n')
    clf = api.finetune(run, labels=str(csv), out=tmp_path / "ft", epochs=1, log=lambda *_: None)
    assert clf.summary["n_labelled"] == 5 and clf.summary["test_top1"] is not None
    state = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)
    assert state["classes"] == ["c0", "c1"] and state["config"]["finetune"]["labels"] == str(csv)
    for body, message in [("path,label\nnope.png,c0\n", "'nope.png' is not one of the run's training images"),
                          ("path\n" + picks[0] + "\n", "columns path and label"),
                          (f"path,label\n{picks[0]},c7\n", "'c7' not among the test set's classes"),
                          (f"path,label\n{picks[0]},c0\n{picks[0]},c1\n", "labelled both 'c0' and 'c1'")]:
        csv.write_text(body)
        r = edgessl("finetune", str(run), "--labels", str(csv), "--out", str(tmp_path / "bad"), "--epochs", "1")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = edgessl("finetune", str(run), "--labels", str(csv), "--labels-per-class", "2", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "give one of" in r.stderr


def test_unlabelled_photos_take_labels_and_train_untested(photos, tmp_path):
    """A flat folder has no classes: the labels name them, and with no held-out images nothing is tested."""
    import edgessl as api

    run = photos / "run_flat"
    picks = api.Run(run).select(budget=4)["picks"]
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f'"{p}",{"dog" if k % 2 else "cat"}\n' for k, p in enumerate(picks)))
    clf = api.finetune(run, labels=str(csv), out=tmp_path / "ft", epochs=1, log=lambda *_: None)
    assert clf.summary["n_labelled"] == 4 and clf.summary["test_top1"] is None
    assert torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)["classes"] == ["cat", "dog"]


def chrome(downloads: Path):
    """Headless Chromium through Selenium and the Debian chromedriver, downloading into `downloads`."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed (Debian packages chromium, chromium-driver; "
                    ".ci/run installs them when it can)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_page_labels_with_keys_and_clicks_and_downloads_the_csv(photos, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    import edgessl as api

    picks = api.Run(photos / "run_labelled").select(budget=5, out=tmp_path / "picks.csv")["picks"]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = chrome(downloads)
    try:
        browser.get((tmp_path / "picks.html").as_uri())
        box = browser.find_element(By.ID, "newclass")
        box.send_keys("cat", Keys.ENTER)
        box.send_keys("dog, big", Keys.ENTER)  # a class name that needs quoting in CSV
        cards = browser.find_elements(By.CSS_SELECTOR, ".card")
        cards[0].click()  # image 1 current
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("1", "2", Keys.ARROW_RIGHT, "1")  # 1: cat, 2: dog, 3 skipped, 4: cat; now on 5
        cards[2].click()  # image 3, then its class by a click on the class; now on 4
        browser.find_element(By.CSS_SELECTOR, '.chip[data-cls="dog, big"]').click()
        body.send_keys("0")  # image 4 cleared again
        assert browser.find_element(By.ID, "count").text == "3 of 5 labelled"
        browser.find_element(By.ID, "download").click()
        target = downloads / "labels.csv"
        for _ in range(100):
            if target.exists():
                break
            time.sleep(0.1)
    finally:
        browser.quit()

    def cell(t):
        return f'"{t}"' if "," in t else t
    assert target.read_text() == (f"path,label\n{cell(picks[0])},cat\n{cell(picks[1])},\"dog, big\"\n"
                                  f"{cell(picks[2])},\"dog, big\"\n")
    assert read_paths(target, "--labels", label=True) == [(picks[0], "cat"), (picks[1], "dog, big"),
                                                          (picks[2], "dog, big")]


def test_a_resume_needs_the_labels_it_started_with(photos, tmp_path):
    """The labelled rows and their labels are the run's identity: a labels.csv changed under a run
    stops its resume with one line; put back, the run resumes."""
    from edgessl.finetuning import finetune

    import edgessl as api

    run = photos / "run_labelled"
    picks = api.Run(run).select(budget=4)["picks"]
    csv = tmp_path / "labels.csv"
    body = "path,label\n" + "".join(f'"{p}",{p.split("/")[0]}\n' for p in picks)
    csv.write_text(body)
    quiet = dict(progress=False, log=lambda *_: None)
    finetune(run, out=tmp_path / "ft", labels=str(csv), epochs=2, stop_at_step=1, **quiet)
    csv.write_text(body.replace(",c0\n", ",c1\n", 1) if ",c0\n" in body else body.replace(",c1\n", ",c0\n", 1))
    with pytest.raises(EdgesslError, match="no longer gives the labelled subset"):
        finetune(None, out=tmp_path / "ft", resume=True, **quiet)
    csv.write_text(body)
    assert finetune(None, out=tmp_path / "ft", resume=True, **quiet)["epochs"] == 2


def test_select_from_other_images_embeds_them_with_the_run(photos, tmp_path):
    """--data: the picks are that folder's files, its features kept beside the run's own."""
    import edgessl as api

    run = api.Run(photos / "run_labelled")
    before = set((photos / "run_labelled" / "features").glob("*.npy"))
    r = run.select(budget=3, data=f"folder:{photos / 'flat'}", out=tmp_path / "p.csv")
    flat = {p.name for p in (photos / "flat").glob("*.png")}
    assert r["pool"] == len(flat) and set(r["picks"]) <= flat and len(set(r["picks"])) == 3
    assert len(set((photos / "run_labelled" / "features").glob("*.npy")) - before) == 1
    assert run.select(budget=3, data=f"folder:{photos / 'flat'}")["features_cached"]


def test_a_run_made_from_relative_paths_works_from_any_directory(photos, tmp_path, monkeypatch):
    """Relative --data and --labels are stored absolute: select, finetune and its resume run the same
    from another working directory (and a same-named file there is never read instead)."""
    from edgessl.finetuning import finetune
    from edgessl.train import pretrain

    import edgessl as api

    monkeypatch.chdir(photos)
    pretrain(tiny_config("folder:labelled", data={"image_size": 32}, optim={"epochs": 1}), tmp_path / "run",
             log=lambda *_: None)
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["spec"]
    assert stored == f"folder:{photos / 'labelled'}"
    (tmp_path / "elsewhere" / "labelled").mkdir(parents=True)  # an empty namesake the run must not read
    monkeypatch.chdir(tmp_path / "elsewhere")
    picks = api.Run(tmp_path / "run").select(budget=4)["picks"]
    Path("labels.csv").write_text("path,label\n" + "".join(f'"{p}",{p.split("/")[0]}\n' for p in picks))
    quiet = dict(progress=False, log=lambda *_: None)
    finetune(tmp_path / "run", out="ft", labels="labels.csv", epochs=2, stop_at_step=1, **quiet)
    ft = torch.load(tmp_path / "elsewhere" / "ft" / "checkpoint.pt", weights_only=False)["config"]["finetune"]
    assert ft["labels"] == str(tmp_path / "elsewhere" / "labels.csv") and ft["source"] == str(tmp_path / "run")
    monkeypatch.chdir(photos)
    assert finetune(None, out=tmp_path / "elsewhere" / "ft", resume=True, **quiet)["epochs"] == 2
