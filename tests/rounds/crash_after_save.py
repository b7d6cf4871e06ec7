"""A killed training process, for the resume tests of policy SFT and PPM training: the callback raises right
after the trainer's checkpoint at ``step`` is on disk, as a SIGKILL at that moment would leave it."""

from transformers import TrainerCallback


class Crash(RuntimeError):
    pass


class CrashAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"simulated crash after checkpoint-{self.step}")
