"""The runtime's block loop written out by hand, for tests that check a session against it."""
from ditbake.runtime.attention import AttentionRunner


def blocks_by_hand(session, plan, ids, h, ctx, deltas: dict, branch: str):
    """Every block of one step and branch: computed ones through the architecture (their Δ = out − in
    stored in `deltas[branch, b]`), skipped ones as h + that cached Δ. Returns the stack's output."""
    w, cfg, arch = session.weights, session.config, session.arch
    for b, vid in enumerate(ids):
        if plan.variants[vid].compute:
            o = arch.block(w, cfg, b, h, ctx, plan.variants[vid], AttentionRunner(), branch)
            deltas[branch, b] = o - h
            h = o
        else:
            h = h + deltas[branch, b]
    return h
