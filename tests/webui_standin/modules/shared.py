"""modules/shared.py: cmd_opts, opts (set/save/add_option), state (the job fields), OptionInfo."""

from types import SimpleNamespace

from modules import devices

cmd_opts = SimpleNamespace(ckpt_dir=None, api_auth=None, no_hashing=False, disable_extension_access=False)
config_filename = "config.json"


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None):
        self.default = default
        self.label = label
        self.section = section
        self.comment_after = ""

    def needs_reload_ui(self):
        self.comment_after += " (requires Reload UI)"
        return self


class Options:
    def __init__(self):
        grids = {"grid_save": True, "grid_format": "png", "grid_background_color": "#ffffff"}
        folders = {"outdir_samples": "", "outdir_txt2img_samples": "outputs/txt2img-images", "outdir_grids": ""}
        folders["outdir_txt2img_grids"] = "outputs/txt2img-grids"
        object.__setattr__(self, "data", {"sd_model_checkpoint": None, **grids, **folders})
        object.__setattr__(self, "data_labels", {})
        object.__setattr__(self, "saved", [])

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def set(self, key, value, is_api=False, run_callbacks=True):
        if run_callbacks:
            raise AssertionError("the adapter sets options without callbacks: it holds the queue lock")
        self.data[key] = value
        return True

    def save(self, filename):
        self.saved.append((filename, dict(self.data)))

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)


class State:
    def __init__(self):
        self.interrupted = False
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None

    def begin(self, job="(unknown)"):
        self.sampling_step = 0
        self.job_count = -1
        self.job_no = 0
        self.interrupted = False
        self.textinfo = None
        self.job = job
        devices.torch_gc()

    def end(self):
        self.job = ""
        self.job_count = 0
        devices.torch_gc()

    def interrupt(self):
        self.interrupted = True


opts = Options()
state = State()
