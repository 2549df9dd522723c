// Merge Lab's page-side parts, and nothing else: the progress bar while a merge, a try or a sweep
// runs, the top checkpoint dropdown after it (the webui's or Forge's), switching to txt2img, reading
// txt2img's settings for a sweep, and the Lora cards after a LoRA is written. The webui injects
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

// Try and Sweep: the progress bar follows the job; values[0] is merge_lab_task_id.
function mergeLabTask() {
    var id = randomId();
    requestProgress(id, gradioApp().getElementById("merge_lab_results_panel"), null, function() {});
    var values = Array.from(arguments);
    values[0] = id;
    return values;
}

// txt2img's current values of the sweep's image fields, in their order: prompt, negative prompt,
// seed, steps, width, height, sampler, CFG scale. A field not found keeps the sweep's own value.
function mergeLabTxt2imgValues(current) {
    var selectors = [
        "#txt2img_prompt textarea", "#txt2img_neg_prompt textarea",
        "#script_txt2img_seed_seed input, #txt2img_seed input", "#txt2img_steps input[type=number]",
        "#txt2img_width input[type=number]", "#txt2img_height input[type=number]",
        "#txt2img_sampling input, #txt2img_sampling select", "#txt2img_cfg_scale input[type=number]",
    ];
    return selectors.map(function(selector, index) {
        var element = gradioApp().querySelector(selector);
        if (!element || element.value === "") {
            return current[index];
        }
        return index < 2 || index === 6 ? element.value : Number(element.value);
    });
}

function mergeLabFromTxt2img() {
    return mergeLabTxt2imgValues(Array.from(arguments));
}

// Sweep with an empty prompt: the image fields come from txt2img (values[5..12], after the task
// id and the four axis fields).
function mergeLabSweep() {
    var values = mergeLabTask.apply(null, arguments);
    if (values[5] === "") {
        var image = mergeLabTxt2imgValues(values.slice(5, 13));
        values.splice(5, 8, ...image);
    }
    return values;
}

// A finished merge leaves <div class="merge-lab-done" data-title data-loaded data-open> in the result.
onUiUpdate(function() {
    var done = gradioApp().querySelector("#merge_lab_result .merge-lab-done:not([data-seen])");
    if (!done) {
        return;
    }
    done.setAttribute("data-seen", "1");
    // The top dropdown's refresh button: the webui's, or Forge's own Checkpoint dropdown's.
    var refresh = gradioApp().getElementById("refresh_sd_model_checkpoint") ||
        gradioApp().getElementById("forge_refresh_checkpoint");
    if (refresh) {
        refresh.click(); // the new checkpoint joins the top dropdown's choices
    }
    if (done.dataset.loaded === "1") {
        selectCheckpoint(done.dataset.title); // already loaded: this only shows it in the top dropdown
    }
    if (done.dataset.open === "1") {
        switch_to_txt2img();
    }
    if (done.dataset.lora === "1") {
        mergeLabRefreshLoraCards();
    }
});

// A LoRA was written into the LoRA folder: the Lora cards of txt2img and img2img list it again,
// through the hidden button each extra networks page refreshes itself with (the webui's and Forge's).
function mergeLabRefreshLoraCards() {
    ["txt2img", "img2img"].forEach(function(tab) {
        var button = gradioApp().getElementById(tab + "_lora_extra_refresh_internal");
        if (button) {
            button.dispatchEvent(new Event("click"));
        }
    });
}
