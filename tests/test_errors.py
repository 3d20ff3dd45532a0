"""One error base for the library, and one place (`exit_code_of`) where errors become exit codes."""
import ast
from pathlib import Path

import pytest

import hscr_fast
from hscr_fast import HscrError
from hscr_fast.runtime.errors import TrainingDiverged, exit_code_of


def _library_error_classes():
    from hscr_fast.data.images import ImageLoadError
    from hscr_fast.data.records import DataFormatError
    from hscr_fast.evaluation.run import AdapterMismatchError, EvaluationError
    from hscr_fast.models.causal_lm import UnsupportedTextModelError
    from hscr_fast.models.convert import ConversionError
    from hscr_fast.models.vlm import UnsupportedModelError
    from hscr_fast.preferences.corruption import EmptyRegionError
    from hscr_fast.runtime.io import JsonlError, OutputOverInputError
    from hscr_fast.training.loop import PreviousRunError

    return [ImageLoadError, DataFormatError, AdapterMismatchError, EvaluationError, UnsupportedTextModelError,
            ConversionError, UnsupportedModelError, EmptyRegionError, JsonlError, OutputOverInputError,
            PreviousRunError]


@pytest.mark.parametrize("error_class", _library_error_classes(), ids=lambda cls: cls.__name__)
def test_every_library_error_is_an_hscr_error(error_class):
    assert issubclass(error_class, HscrError) and issubclass(error_class, ValueError)


def test_image_load_error_stays_an_os_error():
    from hscr_fast.data.images import ImageLoadError

    assert issubclass(ImageLoadError, OSError)


def _raise(error):
    def body():
        raise error
    return body


@pytest.mark.parametrize("error,code", [
    (HscrError("data.json:3: no answer"), 2),
    (FileNotFoundError("model/config.json"), 2),
    (TrainingDiverged("non-finite loss at step 3"), 3),
])
def test_errors_become_one_line_and_their_exit_code(error, code, capsys):
    assert exit_code_of(_raise(error)) == code
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"error: {error}"]


def test_a_body_keeps_its_own_exit_code_and_other_errors_propagate():
    assert exit_code_of(lambda: None) == 0
    assert exit_code_of(lambda: 4) == 4
    with pytest.raises(ZeroDivisionError):  # a bug is a traceback, not a one-line "bad input"
        exit_code_of(lambda: 1 / 0)


def test_no_system_exit_below_the_commands():
    """Only `if __name__ == "__main__": sys.exit(main())` may end the process; library code raises."""
    offenders = []
    for path in Path(hscr_fast.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(node.exc):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
