"""imgclf review, rank, embed and similar, and train --exclude/--relabel, on tiny generated images.

The features come from the tiny bundle (`tiny_bundle`: the tiny timm backbone, random init, whose
features tell the colour classes apart) so nothing needs real weights.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASS_COLOURS, TINY_BACKBONE, make_image, make_image_folder

import imgclf
from imgclf.cli import main
from imgclf.data.decisions import apply_decisions, read_decisions
from imgclf.data.sources import load_dataset
from imgclf.errors import BundleError, DataError
from imgclf.review import embed_files, load_embeddings, save_embeddings, similar_images
from imgclf.review.issues import find_label_issues, find_outliers, out_of_fold_probabilities
from imgclf.review.rank import k_center_greedy, rank_images, select_to_label, uncertainty
from imgclf.review.similar import SimilarityIndex


def _noisy_folder(root: Path) -> tuple[Path, list[str]]:
    """Colour classes with two images moved to a wrong class folder, a broken file and an exact copy."""
    data = make_image_folder(root, classes=3, per_class=20, size=40, seed=3)
    moves = [("class_0/000.png", "class_1/flip_a.png"), ("class_2/003.png", "class_0/flip_b.png")]
    for source, target in moves:
        shutil.move(data / source, data / target)
    (data / "class_1" / "broken.png").write_bytes(b"not an image")
    shutil.copy(data / "class_2" / "005.png", data / "class_2" / "copy_of_005.png")
    return data, [str((data / target).resolve()) for _, target in moves]


@pytest.fixture(scope="module")
def reviewed(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    root = tmp_path_factory.mktemp("review")
    data, flips = _noisy_folder(root / "data")
    out = root / "out"
    assert main(["review", str(data), "--bundle", str(tiny_bundle), "--out", str(out)]) == 0
    return data, flips, out


def test_review_flags_the_moved_images_with_their_true_class(reviewed: tuple[Path, list[str], Path]) -> None:
    _, flips, out = reviewed
    with (out / "label_issues.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "given_label", "suggested_label", "score", "kind"]
    labels = [r for r in rows if r["kind"] == "label"]
    assert {r["path"] for r in labels[:2]} == set(flips)  # both flips, ranked first
    truth = {flips[0]: ("class_1", "class_0"), flips[1]: ("class_0", "class_2")}
    for row in labels[:2]:
        assert (row["given_label"], row["suggested_label"]) == truth[row["path"]]
    scores = [float(r["score"]) for r in labels]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    duplicates = [r for r in rows if r["kind"] == "duplicate"]
    assert [Path(r["path"]).name for r in duplicates] == ["copy_of_005.png"]
    assert len({r["path"] for r in rows}) == len(rows)  # one row per image
    assert not any("broken" in r["path"] for r in rows)


def test_review_json_lists_unreadable_files_and_reuses_the_cache(
    reviewed: tuple[Path, list[str], Path], tiny_bundle: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    data, _, out = reviewed
    capsys.readouterr()
    with caplog.at_level("INFO", logger="imgclf"):
        assert main(["review", str(data), "--bundle", str(tiny_bundle), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert result["counts"]["label"] >= 2 and result["counts"]["duplicate"] == 1
    assert [Path(u["path"]).name for u in result["unreadable"]] == ["broken.png"]
    assert result["images"] == 61 and result["files"]["review_html"].endswith("review.html")
    assert result["top"][0]["kind"] == "label"
    messages = [r.getMessage() for r in caplog.records]
    assert any("61 from the feature cache, 0 computed" in m for m in messages)
    assert any("out-of-fold probabilities from the cache" in m for m in messages)  # no fit either


def test_review_page_is_self_contained(reviewed: tuple[Path, list[str], Path]) -> None:
    page = (reviewed[2] / "review.html").read_text()
    assert "data:image/jpeg;base64," in page and "decisions.csv" in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page


@pytest.mark.parametrize("case", ["empty", "one image", "one class"])
def test_review_bad_input_is_a_clear_error(case: str, tiny_bundle: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if case == "one image":
        (data / "cat").mkdir()
        make_image(CLASS_COLOURS[0], np.random.default_rng(0)).save(data / "cat" / "1.png")
        (data / "dog").mkdir()
    elif case == "one class":
        make_image_folder(data, classes=1, per_class=12)
    assert main(["review", str(data), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    expected = {"empty": "no class folders with images", "one image": "class(es) with readable images",
                "one class": "1 class(es)"}[case]
    assert expected in message and "fix:" in message
    assert not (tmp_path / "out" / "label_issues.csv").exists()


def test_out_of_fold_probabilities_and_cleanlab_find_flipped_labels() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (4, 16))
    true = np.repeat(np.arange(4), 50)
    x = (centres[true] + rng.normal(0, 1, (200, 16))).astype(np.float32)
    given = true.copy()
    flipped = rng.choice(200, 10, replace=False)
    given[flipped] = (true[flipped] + 1) % 4
    probs, l2 = out_of_fold_probabilities(x, given, 4, folds=3)
    assert l2 > 0 and np.allclose(probs.sum(1), 1, atol=1e-5)
    issues = find_label_issues(given, probs)
    assert set(issues.ranked[:10].tolist()) == set(flipped.tolist())
    assert (issues.suggested[flipped] == true[flipped]).all()
    estimated = find_label_issues(given, probs, count="estimate")
    assert len(estimated.ranked) == estimated.estimated_count


def test_outliers_are_images_unlike_all_others() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (80, 8)) + 10
    x[13] = -x[13]  # the opposite direction: cosine-far from everything
    flagged, scores = find_outliers(x, np.zeros(80, dtype=np.int64))
    assert flagged[0] == 13 and scores[13] == scores.min() and len(flagged) < 8  # a few of 80 at most


# -- decisions and train --exclude / --relabel ---------------------------------------------------


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_decisions_exclude_and_relabel_change_the_dataset_not_the_files(image_folder: Path, tmp_path: Path) -> None:
    gone, moved = image_folder / "class_0" / "001.png", image_folder / "class_1" / "002.png"
    decisions = _write(tmp_path / "d.csv", ["path", "given_label", "decision", "label"], [
        [str(gone), "class_0", "remove", ""], [str(moved), "class_1", "relabel", "class_2"],
        [str(image_folder / "class_2" / "000.png"), "class_2", "keep", ""]])
    before = load_dataset(str(image_folder), val_fraction=0.2, seed=0)
    after = apply_decisions(before, exclude=str(decisions), relabel=str(decisions))
    paths = {p: int(label) for split in (after.train, after.val) for p, label in zip(split.paths, split.labels,
                                                                                        strict=True)}
    assert str(gone) not in paths and paths[str(moved)] == 2
    assert len(after.train) + len(after.val) == len(before.train) + len(before.val) - 1
    assert gone.is_file()  # the user's files are untouched
    only_exclude = apply_decisions(before, exclude=str(decisions))
    assert {int(label) for p, label in zip(only_exclude.train.paths, only_exclude.train.labels, strict=True)
            if p == str(moved)} <= {1}


def test_label_issues_csv_works_as_decisions(image_folder: Path, tmp_path: Path) -> None:
    flagged = image_folder / "class_0" / "003.png"
    issues = _write(tmp_path / "label_issues.csv", ["path", "given_label", "suggested_label", "score", "kind"],
                    [[str(flagged), "class_0", "class_1", "0.9", "label"],
                     [str(image_folder / "class_1" / "000.png"), "class_1", "class_1", "1.0", "duplicate"]])
    assert len(read_decisions(issues).removals()) == 2
    assert read_decisions(issues, issues_action="relabel").relabels() == {str(flagged.resolve()): "class_1"}


@pytest.mark.parametrize("rows, expected", [
    ([["a.png", "x", "maybe", ""]], "decision 'maybe'"),
    ([["a.png", "x", "relabel", ""]], "relabel without a label"),
    ([["a.png", "x", "remove", ""], ["a.png", "x", "keep", ""]], "already has the decision remove"),
])
def test_bad_decisions_are_listed_by_line(rows: list[list[str]], expected: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", ["path", "given_label", "decision", "label"], rows)
    with pytest.raises(DataError, match=expected):
        read_decisions(path)


def test_decisions_for_other_data_or_unknown_classes_fail(image_folder: Path, tmp_path: Path) -> None:
    dataset = load_dataset(str(image_folder))
    elsewhere = _write(tmp_path / "d.csv", ["path", "given_label", "decision", "label"],
                       [[str(tmp_path / "nowhere.png"), "x", "remove", ""]])
    with pytest.raises(DataError, match="none of the 1 image"):
        apply_decisions(dataset, exclude=str(elsewhere))
    unknown = _write(tmp_path / "u.csv", ["path", "given_label", "decision", "label"],
                     [[str(image_folder / "class_0" / "000.png"), "class_0", "relabel", "zebra"]])
    with pytest.raises(DataError, match="zebra"):
        apply_decisions(dataset, relabel=str(unknown))
    with pytest.raises(DataError, match="columns"):
        read_decisions(_write(tmp_path / "h.csv", ["file", "what"], [["a", "b"]]))


def test_train_exclude_leaves_out_the_removed_images(image_folder: Path, tmp_path: Path) -> None:
    removed = [image_folder / "class_0" / f"{i:03d}.png" for i in range(4)]
    decisions = _write(tmp_path / "d.csv", ["path", "given_label", "decision", "label"],
                       [[str(p), "class_0", "remove", ""] for p in removed])
    model = imgclf.train(data=str(image_folder), out=str(tmp_path / "m"), backbone=TINY_BACKBONE, random_init=True,
                         recipe="probe", image_size=32, batch_size=16, exclude=str(decisions))
    counts = model.info.data["counts"]
    assert counts["train"]["class_0"] + counts["val"]["class_0"] == 12 - 4
    assert counts["train"]["class_1"] + counts["val"]["class_1"] == 12
    assert model.info.config["exclude"] == str(decisions)
    assert main(["train", str(image_folder), "--out", str(tmp_path / "m2"), "--exclude", str(tmp_path / "no.csv")]) == 2


def test_report_on_its_own_scores_the_split_training_scored(tmp_path: Path) -> None:
    """`imgclf report DIR` rebuilds the data from the bundle: with the run's --exclude applied again."""
    from imgclf.report import write_report

    data = tmp_path / "data"
    make_image_folder(data / "train", per_class=10)
    make_image_folder(data / "val", per_class=4, seed=1)
    removed = [data / "val" / "class_0" / f"{i:03d}.png" for i in range(3)]
    decisions = _write(tmp_path / "d.csv", ["path", "given_label", "decision", "label"],
                       [[str(p), "class_0", "remove", ""] for p in removed])
    model = imgclf.train(data=str(data), out=str(tmp_path / "m"), backbone=TINY_BACKBONE, random_init=True,
                         recipe="probe", image_size=32, batch_size=16, exclude=str(decisions))
    assert model.info.metrics["val"]["num_images"] == 12 - 3
    report = json.loads((write_report(tmp_path / "m").parent / "metrics.json").read_text())
    assert report["split"] == "val" and report["metrics"]["num_images"] == 12 - 3


# -- rank, embed, similar ------------------------------------------------------------------------


def test_uncertainty_and_k_center_pick_uncertain_and_different_images() -> None:
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [0.55, 0.45], [0.99, 0.01], [0.6, 0.4], [0.98, 0.02]])
    assert uncertainty(probs, "margin").argmax() == 0 and uncertainty(probs, "entropy")[3] < 0.1
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.7, 0.7], [0.7, 0.7]])
    picked = select_to_label(probs, emb, 2, pool_factor=2)  # pool: 0, 1, 2, 4; 1 is a copy of 0
    assert picked.tolist() == [0, 2]
    assert sorted(k_center_greedy(emb, 3).tolist()) == [0, 2, 4]


def test_rank_writes_csv_and_page(tiny_bundle: Path, tmp_path: Path) -> None:
    pool = make_image_folder(tmp_path / "pool", classes=3, per_class=6, seed=9)
    result = rank_images(tiny_bundle, pool, n=5, out=tmp_path / "r" / "ranking.csv")
    with result.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5] and len({r["path"] for r in rows}) == 5
    assert {r["guess"] for r in rows} <= {"class_0", "class_1", "class_2"}
    assert result.html.read_text().count("data:image/jpeg;base64,") == 5
    assert main(["rank", str(tiny_bundle), str(pool), "--n", "0"]) == 2


def test_embed_and_similar_find_the_same_picture(tiny_bundle: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8, seed=4)
    out = tmp_path / "emb.npy"
    assert main(["embed", str(data), "--bundle", str(tiny_bundle), "--out", str(out)]) == 0
    found = load_embeddings(out)
    assert found.features.shape == (24, 256) and found.labels is not None and found.labels[0] == "class_0"
    query = data / "class_2" / "004.png"
    capsys.readouterr()
    assert main(["similar", str(tiny_bundle), str(query), "--in", str(out), "--top-k", "3", "--json"]) == 0
    neighbours = json.loads(capsys.readouterr().out)["neighbours"]
    assert neighbours[0]["path"] == str(query.resolve()) and neighbours[0]["similarity"] > 0.999
    assert [n["label"] for n in neighbours] == ["class_2"] * 3
    exact = SimilarityIndex(found.features, found.paths)
    graph = SimilarityIndex(found.features, found.paths, index_min=0)  # faiss HNSW
    assert graph.kind == "faiss hnsw" and graph.search(found.features[5], 1) == exact.search(found.features[5], 1)
    direct = similar_images(tiny_bundle, query, within=str(data), top_k=1)  # a folder, through the cache
    assert direct[0].path == str(query.resolve())


def test_similar_refuses_embeddings_of_another_backbone(tiny_bundle: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=6, seed=2)
    other = tmp_path / "other"
    imgclf.train(data=str(data), out=str(other), backbone="test_resnet", random_init=True, recipe="probe",
                 image_size=32, batch_size=16)
    save_embeddings(embed_files([str(data)], bundle=str(other)), tmp_path / "other.npy")
    with pytest.raises(BundleError, match="cannot be compared"):
        similar_images(tiny_bundle, data / "class_0" / "000.png", within=str(tmp_path / "other.npy"))


def test_served_page_similar_panel_uses_the_bundle_index(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    import time

    from fastapi.testclient import TestClient

    from imgclf.serve import ServeSettings, create_app

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)  # the session's bundle stays without an index
    data = make_image_folder(tmp_path / "data", classes=3, per_class=5, seed=6)
    without = create_app(imgclf.load(bundle), settings=ServeSettings(runtime="torch"))
    assert main(["embed", str(data), "--bundle", str(bundle), "--out", str(bundle / "index.npy")]) == 0
    app = create_app(imgclf.load(bundle), settings=ServeSettings(runtime="torch"))
    with TestClient(without) as client:
        assert client.get("/similar").json() == {"available": False, "images": 0}
        assert client.post("/similar", content=b"x", headers={"content-type": "image/png"}).status_code == 404
    with TestClient(app) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.05)
        assert client.get("/similar").json() == {"available": True, "images": 15}
        query = data / "class_1" / "003.png"
        answer = client.post("/similar?top_k=3", content=query.read_bytes(), headers={"content-type": "image/png"})
        neighbours = answer.json()["neighbours"]
        assert neighbours[0]["name"] == "003.png" and neighbours[0]["label"] == "class_1"
        assert neighbours[0]["similarity"] > 0.999 and neighbours[0]["thumbnail"].startswith("data:image/jpeg")
        assert client.post("/similar", content=b"junk", headers={"content-type": "image/png"}).status_code in (415, 422)
        assert 'src="/static/similar.js"' in client.get("/").text
