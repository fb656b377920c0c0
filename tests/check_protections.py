"""Remove each protection once and check that its test fails (issue 8): a test that still passes
without the protection it guards has no teeth.

    python tests/check_protections.py                  # every protection (a few minutes)
    python tests/check_protections.py "kind check"     # some of them, by name

Each mutation edits one source file, runs the protection's tests and restores the file. Not a
pytest module: it rewrites the package under test, so it must never run inside the suite.
"""
import pathlib
import subprocess
import sys

M = [
 ("kind check", "src/bugscope/io.py", "    if found_kind != kind:\n", "    if False:\n", "tests/test_io.py::test_stale_and_foreign_tables_are_refused"),
 ("config-hash check", "src/bugscope/io.py", "    if config_hash is not None and meta.get(\"config_hash\") != config_hash:\n", "    if False:\n", "tests/test_io.py::test_stale_and_foreign_tables_are_refused"),
 ("truncated parquet", "src/bugscope/io.py", "        return decode_metadata(pq.read_schema(path).metadata)\n    except (pa.ArrowInvalid, OSError) as err:\n", "        return decode_metadata(pq.read_schema(path).metadata)\n    except ZeroDivisionError as err:\n", "tests/test_io.py::test_truncated_parquet_is_refused"),
 ("atomic cleanup", "src/bugscope/io.py", "        if tmp.is_dir():\n            shutil.rmtree(tmp, ignore_errors=True)\n        else:\n            tmp.unlink(missing_ok=True)\n", "        pass\n", "tests/test_io.py::test_atomic_path_leaves_nothing_on_failure"),
 ("disk full", "src/bugscope/io.py", "err.errno == errno.ENOSPC", "err.errno == -12345", "tests/test_io.py::test_disk_full_write_is_clear_and_leaves_nothing"),
 ("stale temporaries", "src/bugscope/io.py", "    for stale in final.parent.glob(final.name + TMP_MARKER + \"*\"):\n", "    for stale in []:\n", "tests/test_io.py::test_temporaries_of_a_killed_writer_are_removed"),
 ("schema", "src/bugscope/config.py", "    if errors:\n        e = errors[0]\n", "    if False:\n        e = errors[0]\n", "tests/test_config.py::test_bad_configs_fail_with_the_key"),
 ("layer range", "src/bugscope/config.py", "        bad = [layer for layer in layers if layer >= n]\n", "        bad = []\n", "tests/test_workflow.py::test_bad_config_fails_before_any_job"),
 ("gated model", "src/bugscope/model/load.py", "    except GatedRepoError as err:\n", "    except ZeroDivisionError as err:\n", "tests/test_model.py::test_gated_or_missing_hub_model"),
 ("problems (diverge/align)", "src/bugscope/data/prompts.py", "    if problems:\n", "    if False:\n", "tests/test_prompts.py::test_answers_that_never_diverge_are_an_error tests/test_prompts.py::test_formats_that_cannot_be_aligned_are_an_error"),
 ("empty prompt set", "src/bugscope/data/prompts.py", "    if not rows:\n", "    if False:\n", "tests/test_prompts.py::test_empty_prompt_set_is_an_error"),
 ("NaN in cache", "src/bugscope/model/cache.py", "                if not torch.isfinite(acts).all():\n", "                if False:\n", "tests/test_cache.py::test_non_finite_activations_stop_the_cache"),
 ("NaN in encode", "src/bugscope/sae/activations.py", "    if not torch.isfinite(x).all():\n", "    if False:\n", "tests/test_sae.py::test_encoding_refuses_nan_activations"),
 ("SAE hook mismatch", "src/bugscope/sae/store.py", "    if found != expected_hook:\n", "    if False:\n", "tests/test_sae.py::test_pretrained_d_in_and_site_mismatch_are_refused"),
 ("SAE d_in mismatch", "src/bugscope/sae/store.py", "    if sae.cfg.d_in != d_model:\n", "    if False:\n", "tests/test_sae.py::test_pretrained_d_in_and_site_mismatch_are_refused"),
 ("stale table, end to end", "src/bugscope/io.py", "    if config_hash is not None and meta.get(\"config_hash\") != config_hash:\n", "    if False:\n", "tests/test_workflow.py::test_reader_refuses_a_table_made_under_other_settings"),
 ("head index range", "src/bugscope/patching/head_sets.py", "    bad = [h for h in heads if not 0 <= int(h) < n_heads]\n", "    bad = []\n", "tests/test_patching.py::test_clear_errors_for_heads_layers_and_empty_sets"),
]
root = pathlib.Path(__file__).resolve().parents[1]
only = sys.argv[1:]
for name, path, old, new, tests in M:
    if only and name not in only:
        continue
    p = root / path
    src = p.read_text()
    assert src.count(old) >= 1, (name, "pattern missing")
    p.write_text(src.replace(old, new, 1))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "--rootdir", str(root), "-q", "-x", "-p", "no:cacheprovider", *tests.split()],
                           capture_output=True, text=True, cwd=root)
    finally:
        p.write_text(src)
    verdict = "FAILS without it (good)" if r.returncode != 0 else "STILL PASSES (test has no teeth)"
    print(f"{name:28s} {verdict}   [{tests}]", flush=True)
