"""Loading a state dict into one of tokred's models, with errors that say what does not fit."""
import torch

__all__ = ["load_checkpoint"]


def load_checkpoint(model: torch.nn.Module, path: str, model_name: str) -> None:
    """Loads a state dict (or a dict holding one under 'model' or 'state_dict') into ``model``;
    a ValueError says what is wrong with a file that is not one, or does not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors alike
        raise ValueError(f"checkpoint {path!r} is not a readable PyTorch state dict "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state:
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(state).__name__}, not a state dict")
    expected, given = set(model.state_dict()), set(state)

    def listed(keys):
        keys = sorted(keys)
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    problems = []
    if expected - given:
        problems.append(f"missing {len(expected - given)} keys: {listed(expected - given)}")
    if given - expected:
        problems.append(f"unexpected {len(given - expected)} keys: {listed(given - expected)}")
    if not problems:
        wrong = [k for k in sorted(expected) if tuple(state[k].shape) != tuple(model.state_dict()[k].shape)]
        if wrong:
            problems.append(f"{len(wrong)} tensors of another shape: " + ", ".join(
                f"{k} {list(state[k].shape)} (expected {list(model.state_dict()[k].shape)})" for k in wrong[:4]))
    if problems:
        raise ValueError(f"checkpoint {path!r} does not fit {model_name}: " + "; ".join(problems))
    model.load_state_dict(state)
