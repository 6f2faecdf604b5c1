"""Real math datasets: each module's `load(**options) -> stepdpo.data.DatasetBundle` is the
`_target_` of one `conf/dataset/<name>.yaml`.

    gsm8k      GSM8K (local train.jsonl/test.jsonl, or the Hub's openai/gsm8k)   answer_format gsm8k
    math       MATH / MATH-500 JSONL (problem, solution, answer, subject, level)  answer_format boxed
    prm800k    PRM800K phase 1/2 label files -> problems + step pairs             answer_format boxed
    step_dpo   Math-Step-DPO-10K (prompt, initial_reason_steps, chosen, ...)      answer_format boxed
    pairs_file your own JSONL of prompt/chosen/rejected (+ optional step scores)

Options every loader takes: `n_train` / `n_eval` (None = all), `seed` (subsampling and
held-out splits), `on_invalid` (`error`: stop at the first bad row naming file:line:field;
`skip`: drop bad rows, log how many and why). Files are read through the `datasets` library
(cached, `.map`); see `common.py`.
"""
