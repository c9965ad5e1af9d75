"""The CPU memory account agrees with a hand count on a tiny model, so its figures can be trusted."""
import torch

from qtune.memory.account import measure_step


def test_cpu_account_matches_hand_count():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    model[0].requires_grad_(False)  # a frozen first layer: no gradient, no optimiser state
    x = torch.randn(32, 100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    acc = measure_step(model, opt, lambda: model(x).logsumexp(1).sum(), x)
    f32 = 4
    trainable = 200 * 10 + 10
    assert acc.kind == "cpu_account"
    assert acc.parameters == (100 * 200 + 200 + trainable) * f32
    assert acc.gradients == trainable * f32
    assert acc.optimizer_state == 2 * trainable * f32 + 2 * f32  # exp_avg, exp_avg_sq; one step counter per tensor
    assert acc.inputs == x.numel() * f32
    # Saved: the ReLU output (read by ReLU's and the second Linear's backward, one storage), logsumexp's input and
    # output. The frozen first Linear saves nothing: its weight needs no gradient and its input is a leaf.
    assert acc.saved_for_backward == (32 * 200 + 32 * 10 + 32) * f32
    # The step allocates at least the saved activations and the gradients.
    assert acc.step_peak >= acc.saved_for_backward + acc.gradients
    assert acc.total == acc.parameters + acc.optimizer_state + acc.inputs + acc.step_peak
