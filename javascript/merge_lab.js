// Merge Lab's page-side parts, and nothing else: the progress bar while a merge runs, the top
// "Stable Diffusion checkpoint" dropdown after it, and switching to txt2img. The webui injects
// this file; the functions it calls (randomId, requestProgress, selectCheckpoint,
// switch_to_txt2img, onUiUpdate, gradioApp) are the webui's own.

function mergeLabSubmit(openTxt2img, args) {
    var id = randomId();
    requestProgress(id, gradioApp().getElementById("merge_lab_results_panel"), null, function() {});
    var values = Array.from(args);
    values[0] = id; // merge_lab_task_id: the task the progress bar follows
    values[1] = openTxt2img; // merge_lab_open_txt2img
    return values;
}

function mergeLabMerge() {
    return mergeLabSubmit(false, arguments);
}

function mergeLabOpenTxt2img() {
    return mergeLabSubmit(true, arguments);
}

// A finished merge leaves <div class="merge-lab-done" data-title data-loaded data-open> in the result.
onUiUpdate(function() {
    var done = gradioApp().querySelector("#merge_lab_result .merge-lab-done:not([data-seen])");
    if (!done) {
        return;
    }
    done.setAttribute("data-seen", "1");
    var refresh = gradioApp().getElementById("refresh_sd_model_checkpoint");
    if (refresh) {
        refresh.click(); // the new checkpoint joins the top dropdown's choices
    }
    if (done.dataset.loaded === "1") {
        selectCheckpoint(done.dataset.title); // already loaded: this only shows it in the top dropdown
    }
    if (done.dataset.open === "1") {
        switch_to_txt2img();
    }
});
