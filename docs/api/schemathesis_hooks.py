"""Loaded by schemathesis in `.ci/api.sh` (SCHEMATHESIS_HOOKS). Not a test hook: a
workaround. Hypothesis describes each lambda given to `.filter()`/`.map()` for its reprs by
parsing the source file of the lambda with `ast.parse`; on CPython 3.11 (this machine's
3.11.7) that parse can raise `SystemError: AST constructor recursion depth mismatch` when
it runs deep in the stack, and schemathesis then reports a runtime error for the operation
it was generating for (seen on `POST /admin/drivers/{id}/suspend` and `GET /admin/drivers`).
The description is cosmetic, so on that error it falls back to hypothesis's own
"<unknown>" lambda text; nothing the tests generate or check changes."""
from hypothesis.internal import lambda_sources

_describe = lambda_sources._lambda_description


def _lambda_description(f):
    try:
        return _describe(f)
    except SystemError:
        return "lambda: <unknown>"


lambda_sources._lambda_description = _lambda_description
