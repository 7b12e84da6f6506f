"""ds_face/runtime/quiet.py drops exactly the messages it names, nothing near them (real warnings machinery and
DeepSpeed's real logger; the launch without them is tests/test_train_cli.py)."""
import logging
import warnings

import ds_face  # noqa: F401  (installs the filters)


def warn_from(module: str, message: str, category=FutureWarning) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        from ds_face.runtime.quiet import quiet
        quiet()  # catch_warnings reset the filters: install them again inside
        warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=83,
                               module=module)
    return [str(w.message) for w in caught]


def test_only_the_all_gather_deprecation_from_c10d_logger_is_dropped():
    deprecated = ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                  "`torch.distributed.all_gather_single` instead.")
    assert warn_from("torch.distributed.c10d_logger", deprecated) == []
    assert warn_from("torch.distributed.c10d_logger", "`torch.distributed.reduce_scatter_tensor` is deprecated.") \
        != [], "another deprecation from the same module still shows"
    assert warn_from("my_code", deprecated) != [], "the same text from elsewhere still shows"
    assert warn_from("torch.distributed.c10d_logger", deprecated, UserWarning) != [], "only as a FutureWarning"


def test_only_deepspeeds_untested_optimizer_line_is_dropped():
    from deepspeed.utils import logger  # DeepSpeed's own logger ("DeepSpeed", prints to stdout)
    assert logging.getLogger("DeepSpeed") is logger

    class Seen(logging.Handler):  # what reaches the logger's handlers, whatever stream they were given
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    def log_from(path: str, message: str) -> str:
        seen = Seen()
        logger.addHandler(seen)
        try:
            logger.handle(logger.makeRecord("DeepSpeed", logging.WARNING, path, 2304, message, (), None))
        finally:
            logger.removeHandler(seen)
        return "\n".join(seen.messages)

    engine = "/site-packages/deepspeed/runtime/engine.py"  # record.module "engine", as DeepSpeed's line has
    untested = "**** You are using ZeRO with an untested optimizer, proceed with caution *****"
    assert log_from(engine, untested) == ""
    assert "something else" in log_from(engine, "something else DeepSpeed says")
    assert "untested optimizer" in log_from("/site-packages/deepspeed/runtime/other.py", untested)


def test_only_the_shm_op_line_is_held_back(capsys):
    from ds_face.runtime.quiet import SHM_OP_LOADED, printing_without
    with printing_without(SHM_OP_LOADED):
        print("before")
        print(SHM_OP_LOADED)
        print(SHM_OP_LOADED + " and more")  # not exactly the line: kept
    assert capsys.readouterr().out == f"before\n{SHM_OP_LOADED} and more\n"
    try:
        with printing_without(SHM_OP_LOADED):
            print("said before a failure")
            raise RuntimeError("init failed")
    except RuntimeError:
        pass
    assert capsys.readouterr().out == "said before a failure\n"


def test_the_cpu_notice_shows_except_where_build_ops_drops_it_through_the_one_filter():
    """`import ds_face` keeps DeepSpeed's "Setting accelerator to CPU" (on a GPU machine it means CUDA was not
    found); build_ops adds it to the same filter, and the DeepSpeed logger holds that one filter only."""
    import subprocess
    import sys
    code = """
import logging, ds_face
from deepspeed.utils import logger
from ds_face.runtime.quiet import CPU_NOTICE, drop_deepspeed_log
notice = CPU_NOTICE + ". If you have GPU or other accelerator, we were unable to detect it."
def shown(path):
    record = logger.makeRecord("DeepSpeed", logging.WARNING, path, 213, notice, (), None)
    return all(f.filter(record) for f in logger.filters)
accelerator = "/site-packages/deepspeed/accelerator/real_accelerator.py"
print(shown(accelerator), len(logger.filters))
drop_deepspeed_log("real_accelerator", CPU_NOTICE)  # what python -m ds_face.runtime.build_ops does
drop_deepspeed_log("real_accelerator", CPU_NOTICE)
print(shown(accelerator), shown("/site-packages/deepspeed/runtime/engine.py"), len(logger.filters))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # the last two lines: before them, DeepSpeed prints its own notice on stdout when its logger is imported
    assert done.stdout.splitlines()[-2:] == ["True 1", "False True 1"], done.stdout + done.stderr
