"""ditbake's kernels: one module per op (reference, Triton kernel, torch.library registration)."""
import logging


class _OnceFilter(logging.Filter):
    """torch logs "Triton not available, find_triton_kernels = []" for every triton_op it
    registers (four per CPU command here): the fact is worth one line, not four."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if "find_triton_kernels" not in str(record.msg):
            return True
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        return True


logging.getLogger("torch._library.triton").addFilter(_OnceFilter())
