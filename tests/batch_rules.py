"""Test-only plugin for the batch tests (loaded with --plugin like any plugin, not installed).

Its rule ends the worker process the way a native crash inside onnxruntime does (SIGSEGV), or
hangs it, but only for a model with a Relu node named ``segfault_here`` / ``hang_here``; on any
other model it refuses quietly and changes nothing.
"""

from __future__ import annotations

import os
import signal
import time

from rewriter.ruletools import Rule, skip

# Plugin rules are opt-in; this one must run in every default run of the batch tests.
JOIN_DEFAULT_POLICY = True


class CrashOnMarkedRelu(Rule):
    """Relu named segfault_here -> the process dies of SIGSEGV; Relu named hang_here -> it hangs"""

    id = "test-crash-on-marked-relu"
    direction = "cleanup"

    def pattern(self, p):
        return p.op("Relu", p.var("x"), name="relu")

    def check(self, m):
        name = m["relu"].name
        if name == "segfault_here":
            os.kill(os.getpid(), signal.SIGSEGV)
        if name == "hang_here":
            time.sleep(600)
        return skip("not a marked Relu", m["relu"])

    def rewrite(self, b, m):
        return m["x"]
