"""The `slow` marker (tests/conftest.py): set on the tests whose code, fixtures or helpers start processes, shown
on real test functions of this suite; the rest stay for `pytest -m "not slow"`."""
import functools
import subprocess

import pytest

from ds_face.runtime.spawn import run_command, run_ranks
from tests import conftest, test_ijb, test_launchers, test_margins, test_partial_fc, test_train_cli
from tests.conftest import starts_processes


def test_the_starters_themselves():
    assert starts_processes(run_ranks) and starts_processes(run_command) and starts_processes(subprocess)
    assert starts_processes(functools.partial(run_command, timeout=1))  # a partial of a starter is one


def test_the_helpers_that_start_processes_and_those_that_do_not():
    assert starts_processes(conftest.launch)  # `deepspeed ...` through run_command
    assert not starts_processes(conftest.make_trainer)  # a Trainer in this process (the ranks call it)
    assert not starts_processes(conftest.write_shards) and not starts_processes(conftest.index_png)


def test_real_tests_of_the_suite():
    assert starts_processes(test_train_cli.test_recordio_to_arrow_to_two_rank_training)  # conftest.launch, imported
    # the same `launch`, imported inside the test from test_train_cli
    assert starts_processes(test_ijb.test_two_rank_training_evaluates_ijb_at_the_last_step)
    assert starts_processes(test_launchers.test_torchrun_and_accelerate_launch_run_the_same_two_rank_training)
    assert starts_processes(test_partial_fc.test_label_out_of_range_fails_on_every_rank_without_hanging)  # run_ranks
    assert not starts_processes(test_partial_fc.test_class_shard_matches_arcface_torch_split)  # same file, one process
    unit = [f for name, f in vars(test_margins).items() if name.startswith("test_")]
    assert unit and not any(starts_processes(f) for f in unit)  # margins: tensors in this process only


def test_a_local_import_is_followed():
    def runs_a_command():
        import subprocess as sp
        return sp.run

    def names_nothing():
        import json
        return json.dumps

    assert starts_processes(runs_a_command) and not starts_processes(names_nothing)


@pytest.fixture
def hands_over_a_starter():
    return run_ranks  # named, never called: the rule reads code, it does not run it


def test_a_fixture_that_starts_processes_marks_its_tests(request, hands_over_a_starter):
    assert request.node.get_closest_marker("slow") is not None


def test_a_test_that_starts_nothing_is_not_marked(request):
    assert request.node.get_closest_marker("slow") is None
