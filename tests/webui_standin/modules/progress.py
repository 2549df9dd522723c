"""modules/progress.py: the task bookkeeping behind /internal/progress and the page's progress bar."""

import time
from collections import OrderedDict

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []
started_tasks = []


def start_task(id_task):
    global current_task
    current_task = id_task
    started_tasks.append(id_task)
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()
