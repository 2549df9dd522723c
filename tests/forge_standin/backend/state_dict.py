"""backend/state_dict.py: the first prefix any key has picks the keys, which leave ``sd`` without it."""


def try_filter_state_dict(sd: dict, prefix_list: list[str], new_prefix: str = "") -> dict:
    for prefix in prefix_list:
        if any(key.startswith(prefix) for key in sd):
            found = {new_prefix + key[len(prefix) :]: sd.pop(key) for key in [k for k in sd if k.startswith(prefix)]}
            return found
    return {}
