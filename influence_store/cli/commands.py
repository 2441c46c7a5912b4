"""Every built-in command, by the module that defines it; ``main`` adds them to the root group (plugins add
theirs through the ``register_commands`` hook)."""

from .demo_commands import demo
from .plugin_commands import approximators, loaders, plugins, policies, rules
from .proposal_commands import examples, export, propose, proposals, review
from .store_commands import db, init, run, runs, scores
from .version_commands import compare, report, verify, versions
from .web_commands import serve

BUILT_IN_COMMANDS = (
    init, db, run, runs, scores,  # the store and the scores it holds
    propose, proposals, review, examples, export,  # a proposal's life
    versions, compare, verify, report,  # model versions and what a curation changed
    plugins, approximators, policies, loaders, rules,  # what is registered
    serve,  # the review page in a browser
    demo,  # the whole loop on the bundled example
)
