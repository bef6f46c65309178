# E4: tensorrt_llm/executor/utils.py
class RequestError(RuntimeError):
    """The error raised when the request is failed (E2: a response that carries an error message)."""
