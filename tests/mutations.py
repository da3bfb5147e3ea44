"""Mutation check: break one important behaviour at a time and see that a test fails.

    python -m tests.mutations                 # every breakage (slow: about 15 minutes on 2 cores)
    python -m tests.mutations --list          # names, files and the tests each one runs
    python -m tests.mutations --only NAME     # one (repeat --only for more)

Each entry of MUTATIONS replaces one exact line fragment (`original`, found exactly once in
`file`; tests/test_mutations.py checks that in CI, so the list follows the code) with
`replacement`, in a scratch copy of the repository's tracked files (a temporary folder;
the working tree is never touched), runs `tests` there, and restores the file. A breakage
is "caught" when those tests fail, "survived" when they pass; the summary lists which test
caught each one. Exit status: 1 if any survived (or could not be applied), else 0.

When code moves, re-point an entry: change `file` and `original` to the line's new home.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # found exactly once in `file`
    replacement: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root


PINNED = "tests/test_pinned_claims.py"
TRAINING = "tests/test_training_claims.py"
RUN = "train/run.py"

MUTATIONS = [
    # ---- Grad-CAM layer
    Mutation("resnet18 CAM layer -> layer3", "covidtl/models.py",
             '"fc", "layer4", "layer4"),', '"fc", "layer3", "layer4"),',
             (f"{PINNED}::test_every_backbone_has_its_expected_cam_layer",)),
    Mutation("efficientnet_lite0 CAM layer -> blocks.5", "covidtl/models.py",
             'cam_layer="bn2",', 'cam_layer="blocks.5",',
             (f"{PINNED}::test_every_backbone_has_its_expected_cam_layer",)),
    Mutation("Predictor hooks last_stage", "covidtl/inference.py",
             "return explain(self.model, x, self.spec.cam_layer, method, class_index)",
             "return explain(self.model, x, self.spec.last_stage, method, class_index)",
             (f"{PINNED}::test_the_predictor_hooks_the_expected_layer",)),
    # ---- intervals
    Mutation("bootstrap level 0.90", "covidtl/metrics.py",
             "level: float = 0.95,", "level: float = 0.90,",
             (f"{PINNED}::test_bootstrap_intervals_are_95_percent_intervals",)),
    Mutation("bootstrap percentiles 5/95", "covidtl/metrics.py",
             "q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])", "q = np.array([5.0, 95.0])",
             (f"{PINNED}::test_bootstrap_intervals_are_95_percent_intervals",)),
    Mutation("per-source metrics on all images", "covidtl/metrics.py",
             "metrics, counts = _metric_block(labels[mask], scores[mask], t, n_boot, seed)",
             "metrics, counts = _metric_block(labels, scores, t, n_boot, seed)",
             (f"{TRAINING}::test_the_card_test_metrics_are_the_exported_models_at_its_threshold",)),
    # ---- threshold
    Mutation("threshold chosen on test", RUN,
             'threshold = metrics.choose_threshold(scores["val"][0], scores["val"][1],',
             'threshold = metrics.choose_threshold(scores["test"][0], scores["test"][1],',
             (f"{TRAINING}::test_the_threshold_is_chosen_on_validation_not_test",)),
    Mutation("threshold ignores the recipe's min_sensitivity", RUN,
             'scores["val"][1], min_sensitivity=config.min_sensitivity)', 'scores["val"][1], min_sensitivity=0.90)',
             (f"{TRAINING}::test_the_threshold_is_chosen_on_validation_not_test",)),
    Mutation("threshold rule >= -> >", "covidtl/metrics.py",
             "feasible = sensitivity >= min_sensitivity", "feasible = sensitivity > min_sensitivity",
             ("tests/test_metrics.py::test_choose_threshold_hand_case",)),
    Mutation("Predictor ignores the card's threshold", "covidtl/inference.py",
             'self.threshold = float(card["threshold"])', "self.threshold = 0.5",
             (f"{PINNED}::test_the_predictor_decides_at_the_cards_threshold",
              "tests/test_app.py::test_classify_handler")),
    Mutation("decision > instead of >=", "covidtl/inference.py",
             "decision=p_positive >= self.threshold,", "decision=p_positive > self.threshold,",
             (f"{PINNED}::test_a_probability_equal_to_the_threshold_is_flagged",)),
    # ---- epochs, resume
    Mutation("per-epoch reseed removed", RUN,
             "torch.manual_seed(config.seed + epoch)  # with EpochSampler", "pass  # with EpochSampler",
             (f"{TRAINING}::test_a_run_resumed_after_its_best_epoch_logs_the_uninterrupted_history",)),
    Mutation("sampler never told the epoch", RUN,
             "        sampler.set_epoch(epoch)\n", "        pass\n",
             (f"{TRAINING}::test_every_epoch_visits_the_training_images_in_another_order",)),
    Mutation("sampler order ignores the epoch", "covidtl/engine.py",
             "manual_seed(self.seed * 100_003 + self.epoch)", "manual_seed(self.seed * 100_003)",
             (f"{TRAINING}::test_every_epoch_visits_the_training_images_in_another_order",)),
    Mutation("best_epoch off by one", RUN,
             'best_auc, best_epoch, stale = val["auc"], epoch + 1, 0',
             'best_auc, best_epoch, stale = val["auc"], epoch, 0',
             (f"{TRAINING}::test_the_exported_weights_are_the_best_validation_epoch",)),
    Mutation("a tie in val AUC counts as a gain", RUN,
             'improved = val["auc"] > best_auc', 'improved = val["auc"] >= best_auc',
             (f"{TRAINING}::test_the_exported_weights_are_the_best_validation_epoch",
              f"{TRAINING}::test_training_stops_after_patience_epochs_without_a_gain")),
    Mutation("early stopping one epoch late", RUN,
             "if stale >= config.early_stopping_patience:", "if stale > config.early_stopping_patience:",
             (f"{TRAINING}::test_training_stops_after_patience_epochs_without_a_gain",)),
    Mutation("resume repeats the last epoch", RUN,
             'history, start_epoch = state["history"], state["epoch"] + 1',
             'history, start_epoch = state["history"][:-1], state["epoch"]',
             (f"{TRAINING}::test_a_run_resumed_after_its_best_epoch_logs_the_uninterrupted_history",)),
    Mutation("resume forgets the stale count", RUN,
             'state["best_auc"], state["best_epoch"], state["stale"]', 'state["best_auc"], state["best_epoch"], 0',
             (f"{TRAINING}::test_a_run_resumed_after_its_best_epoch_logs_the_uninterrupted_history",)),
    # ---- framing and normalization
    Mutation("Predictor ignores crop_fraction", "covidtl/inference.py",
             'self.crop_fraction = float(card.get("crop_fraction", DEFAULT_CROP_FRACTION))',
             "self.crop_fraction = DEFAULT_CROP_FRACTION",
             (f"{PINNED}::test_the_predictor_sees_the_central_crop_fraction_of_the_image",)),
    Mutation("eval resize ignores crop_fraction", "covidtl/transforms.py",
             "return [v2.Resize(round(input_size / crop_fraction)), v2.CenterCrop(input_size)]",
             "return [v2.Resize(round(input_size / 0.9)), v2.CenterCrop(input_size)]",
             (f"{PINNED}::test_the_predictor_sees_the_central_crop_fraction_of_the_image",)),
    Mutation("training eval at 0.9 whatever the recipe", RUN,
             "return eval_loader(records, image_dir, config.image_size(), mean, std, config.crop_fraction,",
             "return eval_loader(records, image_dir, config.image_size(), mean, std, 0.9,",
             (f"{TRAINING}::test_the_threshold_is_chosen_on_validation_not_test",)),
    Mutation("card records crop 0.9", RUN,
             '"crop_fraction": config.crop_fraction,', '"crop_fraction": 0.9,',
             (f"{TRAINING}::test_the_card_records_the_recipes_framing_and_normalization",)),
    Mutation("Predictor ignores the card's mean", "covidtl/inference.py",
             'self.mean = tuple(float(m) for m in card["mean"])', "self.mean = self.spec.mean",
             (f"{PINNED}::test_the_predictor_normalizes_with_the_cards_mean_and_std",
              f"{TRAINING}::test_training_and_the_predictor_make_the_same_tensor_for_a_file")),
    Mutation("Predictor ignores the card's std", "covidtl/inference.py",
             'self.std = tuple(float(s) for s in card["std"])', "self.std = self.spec.std",
             (f"{PINNED}::test_the_predictor_normalizes_with_the_cards_mean_and_std",)),
    # ---- inputs
    Mutation("MONOCHROME1 not inverted", "covidtl/dicom.py",
             '== "MONOCHROME1":', '== "MONOCHROME0":',
             ("tests/test_bad_inputs.py::test_dicom_cases_show_the_film_the_right_way_round",)),
    Mutation("a corpus case dropped", "tests/bad_inputs.py",
             'Case("bmp", _saver("x.bmp", lambda: Image.fromarray(_xray(96))), RESULT, size=(96, 96)),',
             "# bmp dropped",
             ("tests/test_bad_inputs.py::test_the_corpus_has_as_many_kinds_as_the_readme_says",)),
    Mutation("minimum side 31 px", "covidtl/inference.py",
             "MIN_SIDE = 32  #", "MIN_SIDE = 31  #",
             (f"{PINNED}::test_uploads_are_refused_exactly_past_the_side_and_aspect_limits",
              f"{PINNED}::test_the_readmes_upload_limits_are_the_codes")),
    # ---- exports
    Mutation("export checksum check removed", "covidtl/export.py",
             'if "weights_sha256" in card and sha256_file(path) != card["weights_sha256"]:', "if False:",
             ("tests/test_export_kill_steps.py",)),
    # ---- statistics
    Mutation("statistics off by 1e-3", "covidtl/stats.py",
             "means = [s / (count * 255.0) for s in total]", "means = [s / (count * 255.0) + 1e-3 for s in total]",
             ("tests/test_benchmarks.py::test_benchmark_runs_quick_and_prints_its_ratio_last[stats_pass]",)),
    Mutation("stats_pass tolerance not enforced", "benchmarks/stats_pass.py",
             "if not gap <= TOLERANCE:", "if False:",
             ("tests/test_benchmarks.py::test_stats_pass_fails_when_the_statistics_differ_beyond_its_tolerance",)),
    # ---- audit, app
    Mutation("audit masks swapped", "covidtl/audit.py",
             'masks = {"lung_field": lung_mask(size), "border": border_mask(size)}',
             'masks = {"lung_field": border_mask(size), "border": lung_mask(size)}',
             ("tests/test_audit.py::test_cam_audit_averages_the_shares_of_each_image",)),
    Mutation("audit mean -> max", "covidtl/audit.py",
             "round(float(np.nanmean(values)), 4)", "round(float(np.nanmax(values)), 4)",
             ("tests/test_audit.py::test_cam_audit_averages_the_shares_of_each_image",)),
    Mutation("ensemble max instead of mean", "app.py",
             "mean = float(np.mean([answer.p_covid for answer in answers]))",
             "mean = float(np.max([answer.p_covid for answer in answers]))",
             ("tests/test_app.py::test_agreement_sentences",)),
    Mutation("load test asks for the lung model too", "benchmarks/load_test.py",
             "for path in list_exported(folder)]", 'for path in sorted(folder.glob("*.safetensors"))]',
             ("tests/test_safety.py::test_the_load_test_asks_for_the_shipped_classifiers_not_the_lung_model",)),
    Mutation("load test draws patterns even with films", "benchmarks/load_test.py",
             "        if films:\n", "        if False:\n",
             ("tests/test_benchmarks.py::test_the_load_test_sends_films_the_input_check_lets_through",)),
    Mutation("load test serves real models the drawn patterns", "benchmarks/load_test.py",
             "    films = sorted(EXAMPLES.glob(\"*.jpg\"))\n", "    films = None\n",
             ("tests/test_benchmarks.py::test_the_load_test_sends_films_the_input_check_lets_through",)),
    Mutation("mutation list accepts a replacement that does not compile", "tests/mutations.py",
             '    if path.suffix == ".py":\n', "    if False:\n",
             ("tests/test_mutations.py::test_a_breakage_that_does_not_compile_is_not_applied",)),
    Mutation("inference_latency leaves out the lung network", "benchmarks/inference_latency.py",
             "    if predictor.lungs is None:\n", "    if True:\n",
             ("tests/test_benchmarks.py::test_a_lung_crop_model_s_own_forward_runs_its_lung_network_too",)),
    Mutation("inference_latency times a drawn film as its real 1024 px film", "benchmarks/inference_latency.py",
             '"1024x1024 8-bit PNG film": (1024, 1024, 8, common.write_film),',
             '"1024x1024 8-bit PNG film": (1024, 1024, 8, common.write_xray),',
             ("tests/test_benchmarks.py::test_inference_latency_times_the_lung_crop_on_its_real_films",)),
    Mutation("app main serves the environment's weights", "app.py",
             "    served = build_demo(args.weights_dir,", "    served = build_demo(env_weights_dir(),",
             ("tests/test_app.py::test_main_serves_the_demo_its_flags_configure",)),
    Mutation("app builds its demo at import", "app.py",
             "def main(argv: list[str] | None = None) -> None:",
             "demo = build_demo(env_weights_dir(), env_examples_dir(), queue_size=env_queue_size())\n\n\n"
             "def main(argv: list[str] | None = None) -> None:",
             ("tests/test_app.py::test_import_builds_nothing",)),
    # ---- calibration, the one decision, the input check, lungs
    Mutation("Predictor ignores the card's temperature", "covidtl/inference.py",
             "probs = torch.softmax(logits.float() / self.temperature, dim=1)[0].tolist()",
             "probs = torch.softmax(logits.float(), dim=1)[0].tolist()",
             ("tests/test_calibration.py::test_predictor_probabilities_are_softmax_of_logits_over_the_card_temperature",)),
    Mutation("threshold on uncalibrated validation scores", RUN,
             "split: (y, calibration.positive_scores(z, temperature), [r.source for r in splits[split][0]])",
             "split: (y, calibration.positive_scores(z, 1.0), [r.source for r in splits[split][0]])",
             (f"{TRAINING}::test_the_threshold_is_chosen_on_validation_not_test",
              f"{PINNED}::test_a_shipped_threshold_is_the_rule_applied_to_validation")),
    Mutation("label is the larger class, not the decision", "covidtl/decision.py",
             "return FLAGGED if prediction.decision else NOT_FLAGGED",
             "return FLAGGED if prediction.p_positive >= 0.5 else NOT_FLAGGED",
             ("tests/test_scope.py::test_the_label_is_the_decision_at_the_threshold_not_the_larger_class",
              "tests/test_app.py::test_the_decision_is_taken_at_the_threshold_not_the_larger_class")),
    Mutation("input check never refuses by distance", "covidtl/scope.py",
             "if distance > self.cutoff:",
             "if distance > float('inf'):",
             ("tests/test_scope.py::test_a_fitted_gate_refuses_what_is_not_a_chest_xray_and_survives_a_round_trip",)),
    Mutation("Predictor skips the lung crop", "covidtl/inference.py",
             "box = None if self.lungs is None else (lung_crop or self.lung_crop(image)).box",
             "box = None",
             ("tests/test_lung_crop.py::test_predictor_sees_what_training_saw",)),
    Mutation("lung check reads the centroids as (y, x)", "covidtl/lungs.py",
             "(x0, y0), (x1, y1) = centroids[first], centroids[second]",
             "(y0, x0), (y1, x1) = centroids[first], centroids[second]",
             ("tests/test_lungs.py::test_two_side_by_side_lungs_are_plausible",
              "tests/test_lungs.py::test_implausible_masks_say_why")),
    Mutation("lung check sizes the lungs by label instead of area", "covidtl/lungs.py",
             "sizes = [int(areas[i]) for i in order[:3]]",
             "sizes = [int(i) for i in order[:3]]",
             ("tests/test_lungs.py::test_implausible_masks_say_why",)),
    Mutation("an answer leaves out its recipe's held-out result", "app.py",
             "    recipe_held_out = (held_out or {}).get(predictor.name)\n", "    recipe_held_out = None\n",
             ("tests/test_app.py::test_an_answer_says_what_its_recipe_did_at_sites_it_never_saw",)),
    Mutation("train.loso writes its result where neither the app nor the table reads it", "train/loso.py",
             'held_out_path(Path("weights"), config.name)', 'Path("weights") / f"{config.name}.json"',
             ("tests/test_loso.py::test_each_fold_trains_without_its_source_and_scores_all_of_it",)),
    Mutation("the Models tab leaves out the held-out folds", "app.py",
             "gr.Markdown(card_markdown(card, folder.held_out.get(name)))", "gr.Markdown(card_markdown(card))",
             ("tests/test_app.py::test_the_models_tab_shows_the_held_out_folds_beside_a_card",)),
    Mutation("a held-out result of another run is shown", "covidtl/cards.py",
             "    if ran != expected:\n", "    if False:\n",
             ("tests/test_app.py::test_held_out_results_are_read_only_for_the_card_s_own_recipe_run",)),
    Mutation("another schedule's held-out runs count as other seeds", "covidtl/cards.py",
             'if of["recipe"] == name and of["epochs"] == ran["epochs"] and of["seed"] != ran["seed"]',
             'if of["recipe"] == name and of["seed"] != ran["seed"]',
             ("tests/test_app.py::test_held_out_results_are_read_only_for_the_card_s_own_recipe_run",)),
    Mutation("other seeds' AUC sought on a one-class source", "covidtl/cards.py",
             'key = "auc" if _value(fold["overall"], "auc") is not None else "specificity"', 'key = "auc"',
             ("tests/test_app.py::test_an_answer_says_what_its_recipe_did_at_sites_it_never_saw",
              "tests/test_app.py::test_card_markdown_shows_the_held_out_folds")),
    Mutation("lung outline lost when the opacity changes", "covidtl/answer.py",
             "return blended if lungs is None else draw_outline(blended, lungs)",
             "return blended",
             ("tests/test_lungs.py::test_the_app_outlines_the_lungs_the_model_sees",)),
    Mutation("Classify and Compare crop again for the heatmap's view", "covidtl/answer.py",
             'extras["view"] = predictor.view(film, crop)',
             'extras["view"] = predictor.view(film)',
             ("tests/test_lung_crop.py::test_one_classify_request_runs_the_lung_model_once",
              "tests/test_lung_crop.py::test_compare_crops_once_for_the_models_that_share_a_geometry")),
    # ---- the answer to a film (covidtl.answer), start-up, the batch command
    Mutation("an answer's other seeds always sought by AUC", "covidtl/answer.py",
             'metric = "auc" if _value(overall, "auc") is not None else "specificity"', 'metric = "auc"',
             ("tests/test_app.py::test_an_answer_says_what_its_recipe_did_at_sites_it_never_saw",)),
    Mutation("Compare locates the lungs again for a lung-crop model of the same lung model", "covidtl/answer.py",
             "predictor.lungs is None or predictor.uses_lung_model(lungs.sha256))",
             "predictor.lungs is None)",
             ("tests/test_inference.py::test_a_lung_crop_model_trained_with_the_folders_lung_model_reuses_its_pass",)),
    Mutation("the folder's lung model forgets its checksum (Compare locates the lungs twice)", "covidtl/lungs.py",
             'return cls(model, card["weights_sha256"])', "return cls(model)",
             ("tests/test_shipped_weights.py::test_the_folders_lung_model_is_recognised_by_every_shipped_lung_crop_model",)),
    Mutation("a lung-crop model crops a film another lung model located", "covidtl/inference.py",
             'and self.card["lung_crop"]["lung_model_sha256"] == sha256',
             "",
             ("tests/test_inference.py::test_a_lung_crop_model_trained_with_the_folders_lung_model_reuses_its_pass",)),
    Mutation("a film without two lung fields gets a decision", "covidtl/answer.py",
             "reason = lung_field_reason(found) if found is not None else None", "reason = None",
             ("tests/test_inference.py::test_a_film_without_two_lung_fields_is_out_of_scope_for_every_model",)),
    Mutation("every thread that asks first loads the model again", "covidtl/inference.py",
             "            if not self._loaded:\n", "            if True:\n",
             ("tests/test_inference.py::test_load_once_loads_once_for_threads_that_ask_together",)),
    Mutation("the app loads its models before it serves", "app.py",
             "    served.launch(**launch_options(args.host, args.port, args.share), prevent_thread_lock=True)\n"
             "    folder.warm_up()\n",
             "    folder.warm_up()\n"
             "    served.launch(**launch_options(args.host, args.port, args.share), prevent_thread_lock=True)\n",
             ("tests/test_app.py::test_main_serves_the_demo_its_flags_configure",)),
    Mutation("covidtl-predict succeeds when a file failed", "train/predict.py",
             "return 1 if failed else 0", "return 0",
             ("tests/test_predict.py::test_one_line_per_film_and_a_failed_file_sets_the_exit_status",)),
    # ---- histogram equalization: one step in training, evaluation and the app
    Mutation("Predictor ignores the card's equalize", "covidtl/inference.py",
             "eval_view(self.input_size, self.crop_fraction, self.equalize)",
             "eval_view(self.input_size, self.crop_fraction, False)",
             ("tests/test_train_cli.py::test_an_equalizing_recipe_is_followed_by_the_card_evaluate_and_the_predictor",)),
    Mutation("train.evaluate ignores the card's equalize", "train/evaluate.py",
             'equalize=bool(card.get("equalize", False)))',
             "equalize=False)",
             ("tests/test_train_cli.py::test_an_equalizing_recipe_is_followed_by_the_card_evaluate_and_the_predictor",)),
    Mutation("training never equalizes", "covidtl/loaders.py",
             "        equalize=config.equalize,",
             "        equalize=False,",
             ("tests/test_augment.py::test_the_recipe_equalizes_training_films_as_it_does_evaluation_ones",)),
    Mutation("recode runs after the framing", "covidtl/transforms.py",
             "        steps.insert(0, recode)",
             "        steps.append(recode)",
             ("tests/test_augment.py::test_the_recipe_recodes_training_films_before_the_framing_and_never_at_eval",)),
    Mutation("recode never resizes back", "covidtl/augment.py",
             "            return copy.convert(image.mode).resize(image.size, up)",
             "            return copy.convert(image.mode)",
             ("tests/test_augment.py::test_recode_keeps_size_and_mode_and_changes_the_texture_only",)),
    # ---- film_size: one resolution for every film, in the cache, train.evaluate and the app
    Mutation("the cache keeps each film's own resolution", "covidtl/cache.py",
             'image = film_part(image, box, _job["film_size"], _job["film_jpeg"])',
             "image = film_part(image, box, None)",
             ("tests/test_harmonize.py::test_the_predictor_sees_the_film_size_the_training_cache_saw",)),
    Mutation("Predictor ignores the card's film_size", "covidtl/inference.py",
             "return film_part(_l_or_rgb(image), box, self.film_size, self.film_jpeg)",
             "return film_part(_l_or_rgb(image), box, None)",
             ("tests/test_harmonize.py::test_the_predictor_sees_the_film_size_the_training_cache_saw",)),
    Mutation("train.evaluate ignores the card's film_size", "covidtl/cache.py",
             "lung_weights=lung_weights if crop else None, film_size=film_size,",
             "lung_weights=lung_weights if crop else None, film_size=None,",
             ("tests/test_harmonize.py::test_evaluate_brings_the_films_to_the_cards_film_size_like_the_predictor",)),
    # ---- resolution audit: the same films at other sizes
    Mutation("the resolution audit compares each variant with itself", "covidtl/resolution_audit.py",
             '"flipped": float((decided[name] != decided["as_is"]).mean()),',
             '"flipped": float((decided[name] != decided[name]).mean()),',
             ("tests/test_resolution_audit.py::test_a_decision_that_follows_the_films_width_is_counted_as_changed",)),
    Mutation("the square variant keeps the film's size", "covidtl/resolution_audit.py",
             "return image.resize((SQUARE_SIDE, SQUARE_SIDE), Image.Resampling.BILINEAR)",
             "return image.copy()",
             ("tests/test_resolution_audit.py::test_the_variants_are_half_double_the_public_square_and_its_jpeg_copy",)),
    Mutation("a sample spread over the sources takes the first films", "covidtl/labels.py",
             "return [ranked[i] for i in dict.fromkeys(round(k * step) for k in range(count))]",
             "return ranked[:count]",
             ("tests/test_resolution_audit.py::test_spread_keeps_every_sources_share",)),
    Mutation("train.resolution_audit leaves the cards alone", "train/resolution_audit.py",
             'set_card_entry(path, "resolution_audit", result)',
             "pass",
             ("tests/test_resolution_audit.py::test_the_command_writes_each_cards_audit_shown_in_the_card_and_the_table",)),
    # ---- a cache per record set: caching a subset never replaces the cache a running job reads
    Mutation("the cache folder ignores the records", "covidtl/cache.py",
             'text = f"{image_dir.resolve()}\\0{records_sha}\\0{input_size}',
             'text = f"{image_dir.resolve()}\\0{input_size}',
             ("tests/test_cache.py::test_caching_a_subset_leaves_a_running_jobs_cache_alone",)),
    Mutation("a replaced cache is read at shifted rows", "covidtl/cache.py",
             "if len(pixels) != len(self.cache):  # replaced since this job opened it",
             "if False:",
             ("tests/test_cache.py::test_caching_a_subset_leaves_a_running_jobs_cache_alone",)),
    # ---- a card's cache (train.evaluate, the shipped-weights test): framed as its training cache
    Mutation("a card's cache is grey whatever its colour", "covidtl/cache.py",
             'color = card.get("config", {}).get("cache", "gray")',
             'color = "gray"',
             ("tests/test_cache.py::test_a_cards_cache_is_framed_as_its_training_cache_was",)),
    Mutation("a card's cache takes any lung model", "covidtl/cache.py",
             'if sha256_file(Path(lung_weights)) != crop["lung_model_sha256"]:',
             "if False:",
             ("tests/test_cache.py::test_a_lung_crop_cards_cache_needs_the_lung_model_it_was_trained_with",)),
    Mutation("train.evaluate scores a lung-crop model on whole films", "train/evaluate.py",
             "lung_weights = card_lung_weights(card, args.lung_weights)",
             "lung_weights = None",
             ("tests/test_evaluate.py",)),
    Mutation("train.site_audit ignores --lung-weights", "train/site_audit.py",
             "lung_weights = card_lung_weights(card, args.lung_weights)",
             "lung_weights = card_lung_weights(card, None)",
             ("tests/test_site_blind.py::test_the_site_audit_command_frames_a_lung_crop_card_with_its_own_lung_model_only",)),
    Mutation("training caches ignore the recipe's film_size", RUN,
             "lung_weights=lung_weights, film_size=config.film_size, film_jpeg=config.film_jpeg)",
             "lung_weights=lung_weights)",
             ("tests/test_train_cli.py::test_a_film_size_recipe_is_trained_on_recorded_and_served",)),
    Mutation("training caches ignore the recipe's film_jpeg", RUN,
             "film_size=config.film_size, film_jpeg=config.film_jpeg)",
             "film_size=config.film_size)",
             ("tests/test_train_cli.py::test_a_film_size_recipe_is_trained_on_recorded_and_served",)),
    Mutation("the card leaves out film_jpeg", RUN,
             '"film_jpeg": config.film_jpeg,',
             '"film_jpeg": None,',
             ("tests/test_train_cli.py::test_a_film_size_recipe_is_trained_on_recorded_and_served",)),
    Mutation("the cache build cuts from the film, not its JPEG copy", "covidtl/cache.py",
             'image = film_part(image, box, _job["film_size"], _job["film_jpeg"])',
             'image = film_part(image, box, _job["film_size"])',
             ("tests/test_harmonize.py::test_the_predictor_cuts_from_the_jpeg_copy_the_training_cache_cut_from",)),
    Mutation("Predictor ignores the card's film_jpeg", "covidtl/inference.py",
             "return film_part(_l_or_rgb(image), box, self.film_size, self.film_jpeg)",
             "return film_part(_l_or_rgb(image), box, self.film_size)",
             ("tests/test_harmonize.py::test_the_predictor_cuts_from_the_jpeg_copy_the_training_cache_cut_from",)),
    Mutation("train.evaluate ignores the card's film_jpeg", "covidtl/cache.py",
             'film_jpeg=card.get("film_jpeg"))',
             "film_jpeg=None)",
             ("tests/test_harmonize.py::test_evaluate_brings_the_films_to_the_cards_film_size_like_the_predictor",)),
    Mutation("the copy's box is not scaled", "covidtl/harmonize.py",
             "    sx, sy = film_size / film.width, film_size / film.height",
             "    sx, sy = 1.0, 1.0",
             ("tests/test_harmonize.py::test_a_part_of_the_copy_is_its_box_scaled_into_the_copy",)),
    Mutation("the card leaves out film_size", RUN,
             '"film_size": config.film_size,',
             '"film_size": None,',
             ("tests/test_train_cli.py::test_a_film_size_recipe_is_trained_on_recorded_and_served",)),
    Mutation("the database variant skips the database's 299 px step", "covidtl/resolution_audit.py",
             "    return film_copy(database, SQUARE_SIDE, COPY_QUALITY)",
             "    return film_copy(image, SQUARE_SIDE, COPY_QUALITY)",
             ("tests/test_resolution_audit.py::test_the_variants_are_half_double_the_public_square_and_its_jpeg_copy",)),
    Mutation("the resolution table takes its variants from the first audited card", "train/model_table.py",
             "    names = list(VARIANTS)",
             '    names = list(next(c["resolution_audit"]["variants"] for c in cards if c.get("resolution_audit")))',
             ("tests/test_resolution_audit.py::test_a_card_audited_before_a_variant_existed_shows_it_as_not_audited",)),
    Mutation("the fold audit frames without the recipe's JPEG copy", "train/fold_audit.py",
             '"film_jpeg": config.film_jpeg,',
             '"film_jpeg": None,',
             ("tests/test_loso.py::test_the_fold_audit_scores_a_folds_model_as_the_fold_scored_it",)),
    Mutation("a recipe's own mean and std are ignored", "covidtl/config.py",
             "        if self.mean is not None:\n            return self.mean, self.std\n",
             "",
             ("tests/test_loso.py::test_a_fold_is_normalized_as_its_recipe_says",)),
    Mutation("the fold audit ignores the fold's temperature", "train/fold_audit.py",
             '"temperature": fold["temperature"],',
             '"temperature": 1.0,',
             ("tests/test_loso.py::test_the_fold_audit_scores_a_folds_model_as_the_fold_scored_it",)),
    Mutation("a resumed LOSO run trains every fold again", "train/loso.py",
             "        chosen = [source for source in chosen if source not in done]",
             "        chosen = list(chosen)",
             ("tests/test_loso.py::test_a_resumed_run_keeps_the_folds_it_has_and_runs_the_rest",)),
    Mutation("a LOSO run resumes from another run's folds", "train/loso.py",
             '    differ = [key for key in ("recipe", "data", "epochs", "seed") if earlier.get(key) != result[key]]',
             "    differ = []",
             ("tests/test_loso.py::test_a_resumed_run_keeps_the_folds_it_has_and_runs_the_rest",)),
    # ---- leave-one-source-out runs the recipe as python -m train does
    Mutation("LOSO folds ignore train_sources", "train/loso.py",
             'keep_sources(train_records, config.train_sources, "train")',
             "train_records",
             ("tests/test_loso.py::test_folds_follow_the_recipes_train_sources_lung_crop_equalize_input_size_and_seed",)),
    Mutation("LOSO and training's evaluation score without equalizing", RUN,
             "                       equalize=config.equalize)",
             "                       equalize=False)",
             ("tests/test_loso.py::test_folds_follow_the_recipes_train_sources_lung_crop_equalize_input_size_and_seed",)),
    Mutation("LOSO caches at the backbone's input size", "train/loso.py",
             "splits, caches = prepare_caches(config, args.data, splits, config.image_size(),",
             "splits, caches = prepare_caches(config, args.data, splits, get_spec(config.backbone).input_size,",
             ("tests/test_loso.py::test_folds_follow_the_recipes_train_sources_lung_crop_equalize_input_size_and_seed",)),
    Mutation("train.loso --seed ignored", "train/loso.py",
             '"seed": args.seed})',
             "})",
             ("tests/test_loso.py::test_folds_follow_the_recipes_train_sources_lung_crop_equalize_input_size_and_seed",)),
    Mutation("a one-class fold is ranked against every validation film", "train/loso.py",
             "other = val_labels != labels[0]",
             "other = val_labels == val_labels",
             ("tests/test_loso.py::test_a_one_class_source_is_ranked_against_the_validation_films_of_the_other_class",)),
    Mutation("LOSO builds its caches without the lung crop", "train/loso.py",
             "                                    lung_weights=lung_weights)",
             "                                    lung_weights=None)",
             ("tests/test_loso.py::test_folds_follow_the_recipes_train_sources_lung_crop_equalize_input_size_and_seed",)),
    Mutation("training ignores train_sources", RUN,
             "splits[split] = (keep_sources(splits[split][0], config.train_sources, split), splits[split][1])",
             "splits[split] = splits[split]",
             ("tests/test_train_cli.py::test_train_sources_limit_training_and_selection_but_test_is_scored_whole",)),
    # ---- mixup and the recipe's input size
    Mutation("a mixup recipe trains without mixup", RUN,
             "mixup=config.mixup, site_blind",
             "mixup=0.0, site_blind",
             ("tests/test_train_cli.py::test_a_mixup_recipe_mixes_every_training_batch",)),
    Mutation("the source adversary's gradient is not reversed", "covidtl/site_blind.py",
             "return -ctx.scale * grad, None",
             "return ctx.scale * grad, None",
             ("tests/test_site_blind.py::test_grad_reverse_is_identity_forward_and_negates_the_scaled_gradient_backward",
              "tests/test_site_blind.py::test_adversarial_training_removes_the_source_from_the_features_the_classifier_uses")),
    Mutation("the site-blind losses never reach the optimizer", "covidtl/engine.py",
             "loss = loss + sum(extra.values())",
             "loss = loss",
             ("tests/test_site_blind.py::test_train_one_epoch_trains_the_site_blind_heads_with_the_model",)),
    Mutation("samples_per_epoch is ignored", "covidtl/loaders.py",
             "num_samples=config.samples_per_epoch)",
             "num_samples=None)",
             ("tests/test_site_blind.py::test_the_training_loader_draws_the_recipes_samples_per_epoch",)),
    Mutation("the site audit ignores patients in its folds", "covidtl/site_audit.py",
             "predicted = cross_val_predict(probe, features, y, groups=list(groups), cv=splitter)",
             "predicted = cross_val_predict(probe, features, y, groups=list(range(len(y))), cv=splitter)",
             ("tests/test_site_blind.py::test_the_probe_keeps_a_patients_films_in_one_fold",)),
    Mutation("mixup scores the blend against its own labels only", "covidtl/engine.py",
             "loss = lam * criterion(logits, labels) + (1 - lam) * criterion(logits, partners)",
             "loss = criterion(logits, labels)",
             ("tests/test_engine.py::test_a_mixed_batch_is_scored_against_both_labels_in_proportion",)),
    Mutation("the recipe's input_size is ignored", "covidtl/config.py",
             "return self.input_size if self.input_size is not None else get_spec(self.backbone).input_size",
             "return get_spec(self.backbone).input_size",
             ("tests/test_train_cli.py::test_a_recipe_input_size_is_trained_on_recorded_and_served",)),
    Mutation("a cosine recipe steps ReduceLROnPlateau", RUN,
             'if config.lr_schedule == "cosine":', 'if False:  # lr_schedule ignored',
             ("tests/test_train_cli.py::test_a_cosine_schedule_follows_the_epoch_budget_not_validation",)),
    Mutation("keep_epoch last keeps the best validation epoch", RUN,
             'improved = val["auc"] > best_auc or config.keep_epoch == "last"',
             'improved = val["auc"] > best_auc',
             ("tests/test_train_cli.py::test_keep_epoch_last_runs_the_whole_schedule_and_ships_its_last_weights",)),
    Mutation("the README's API example shows an output the app does not print", "README.md",
             "'p_covid': 0.6217856407165527", "'p_covid': 0.2",
             ("tests/test_docs.py::test_the_readme_api_example_runs_as_written_and_prints_what_the_readme_shows",)),
    Mutation("the README's model table drops the held-out estimate", "train/model_table.py",
             "held_out_cell(held.run if held else None)", "held_out_cell(None)",
             ("tests/test_shipped_weights.py::test_the_readmes_model_table_is_generated_from_the_cards",)),
    Mutation("the lung-field rule changes without its record", "covidtl/scope.py",
             "FIELD_MIN_RATIO = 0.05", "FIELD_MIN_RATIO = 0.06",
             ("tests/test_scope.py::test_the_lung_field_record_is_current_and_meets_its_bounds",)),
]  # fmt: skip


def check(mutation: Mutation, root: Path = ROOT) -> str | None:
    """None if `mutation` applies to `root` (original found exactly once, and a Python file
    still compiles after it: a syntax error would fail every test and prove nothing), else why not."""
    path = root / mutation.file
    if not path.is_file():
        return f"{mutation.file} does not exist"
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        return f"{mutation.original!r} is found {count} times in {mutation.file}, not once"
    if mutation.original == mutation.replacement:
        return "the replacement changes nothing"
    if path.suffix == ".py":
        try:
            compile(text.replace(mutation.original, mutation.replacement), str(path), "exec")
        except SyntaxError as error:
            return f"the mutated {mutation.file} does not compile ({error.msg}, line {error.lineno}); fix the replacement"
    return None


def scratch_copy(destination: Path) -> None:
    """Copy the repository's files (tracked, and untracked ones git does not ignore) to `destination`."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(command, cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    shared = ROOT.parent / "shared"
    if shared.is_dir():  # tests on real data look for ../shared beside the repository
        (destination.parent / "shared").symlink_to(shared)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, list[str], str]:
    """(pytest exit status, ids of failed tests, output tail)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "GRADIO_TEMP_DIR": tempfile.mkdtemp(prefix="gradio-", dir=copy.parent)}  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", *tests],
            cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, [], "timed out"
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.MULTILINE)
    return proc.returncode, failed, (proc.stdout + proc.stderr)[-2000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the breakages and exit")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this breakage (repeatable)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per breakage's test run")
    p.add_argument("--verbose", action="store_true", help="print pytest's output tail for each breakage")
    args = p.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            p.error(f"unknown breakages {unknown}; see --list")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.file}: {m.original.strip()!r} -> {m.replacement.strip()!r}")
            print(f"    tests: {' '.join(m.tests)}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="covidtl-mutations-") as scratch:
        copy = Path(scratch) / "repo"
        scratch_copy(copy)
        for m in chosen:
            started = time.perf_counter()
            problem = check(m, copy)
            if problem:
                verdict, caught_by = "NOT APPLIED", problem
            else:
                path = copy / m.file
                original = path.read_text()
                path.write_text(original.replace(m.original, m.replacement))
                try:
                    status, failed, tail = run_tests(copy, m.tests, args.timeout)
                finally:
                    path.write_text(original)
                if status == 0:
                    verdict, caught_by = "SURVIVED", "every test passed"
                elif status == 1 or failed:
                    verdict, caught_by = "caught", ", ".join(failed) or "tests failed"
                else:  # collection error, timeout, no tests run: not a clean catch
                    verdict, caught_by = "ERROR", f"pytest exit status {status}: {tail.strip().splitlines()[-1:]}"
                if args.verbose:
                    print(tail)
            results.append((m, verdict))
            print(f"{verdict:11s} {m.name} ({time.perf_counter() - started:.0f} s): {caught_by}", flush=True)

    caught = sum(verdict == "caught" for _, verdict in results)
    print(f"total: {caught} caught, {len(results) - caught} not caught, of {len(results)} breakages")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
