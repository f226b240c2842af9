"""A dataset loader used by the CUSTOM-format tests (`module:function` reference)."""


def load_rows(path: str | None = None, count: str = "3"):
    return [{"text": f"row {index} from {path or 'nowhere'}"} for index in range(int(count))]


def not_mappings():
    return ["just a string"]
