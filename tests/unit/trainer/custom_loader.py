"""A dataset loader used by the CUSTOM-format tests (`module:function` reference)."""


def load_rows(path: str | None = None, count: int = 3, prefix: list[str] | None = None):
    assert isinstance(count, int), "arguments arrive as the JSON values written"
    head = " ".join(prefix or ["row"])
    return [{"text": f"{head} {index} from {path or 'nowhere'}"} for index in range(count)]


def not_mappings():
    return ["just a string"]
