"""Background prefetch: right after collection, each xdist worker compiles the next of the
run's libraries no other worker holds; every library is still compiled exactly once
(counted by the factory)."""

from __future__ import annotations

from conftest import Project, hold_tests

FOUR = [{"hidden": h} for h in (3, 4, 5, 6)]


def test_prefetch_compiles_every_library_once_ahead_of_time(project: Project) -> None:
    project.write_tests(FOUR, per_config=2)
    hold_tests(project, 4)
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=auto")
    result.assert_outcomes(passed=8)
    assert len(project.compiles()) == 4
    result.stdout.fnmatch_lines(["8 requests: 8 hits; 4 libraries compiled ahead of time, *"])
    warm = project.run("-n", "2", "--mlc-device=cpu")
    warm.assert_outcomes(passed=8)
    assert len(project.compiles()) == 4, "a warm run prefetches nothing new"
    warm.stdout.fnmatch_lines(["8 requests: 8 hits"])


def test_prefetch_off_and_single_process(project: Project) -> None:
    project.write_tests(FOUR[:2], per_config=2)
    off = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=off")
    off.assert_outcomes(passed=4)
    assert "ahead of time" not in off.stdout.str()
    project.write_tests(FOUR[2:], per_config=2, name="test_more")
    hold_tests(project, 4)
    single = project.run("-p", "no:xdist", "--mlc-device=cpu", "--mlc-jit-prefetch=on")
    single.assert_outcomes(passed=8)
    single.stdout.fnmatch_lines(["8 requests: 8 hits; 2 libraries compiled ahead of time, *"])
    assert len(project.compiles()) == 4


def test_no_prefetch_when_the_policy_does_not_write(project: Project) -> None:
    project.write_tests(FOUR[:2])
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-policy=READONLY",
                         "--mlc-jit-prefetch=on")
    result.assert_outcomes(errors=2)
    assert project.compiles() == []


def test_a_failing_library_is_compiled_once_and_reported_by_its_tests(project: Project) -> None:
    project.write_tests([{"hidden": 4, "fail": True}, {"hidden": 5}], per_config=3)
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=on")
    result.assert_outcomes(passed=3, errors=3)
    assert len(project.compiles()) == 2, "the failing one was tried once, by prefetch"
    assert result.stdout.str().count("factory failed on purpose (hidden=4)") >= 3




def test_prefetch_builds_nothing_for_a_test_whose_own_policy_does_not_write(
        project: Project) -> None:
    """A test marked READONLY in an ON run: its request's policy decides, so prefetch does
    not compile its library either, and the test fails as READONLY does."""
    project.pytester.makepyfile(test_readonly_marked='''
        import pytest
        from pytest_mlcjit import TVMModel

        @pytest.mark.mlc_jit_policy("READONLY")
        @pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 7}))
        def test_marked(compiled_model):
            pass

        @pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 3}))
        def test_plain(compiled_model):
            pass
    ''')
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=on")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*CacheMissError: no cached library*"])
    assert [line.split()[1] for line in project.compiles()] == ["hidden=3"]
