"""The LangChain adapter lives in `collab_agent.langchain`: the old import paths give the same
objects, and below the adapter (and the server built on it) nothing loads it."""

from __future__ import annotations

from test_layering import MODULES, _chain, _graph, _loaded_by

ADAPTER = "collab_agent.langchain"
MAY_LOAD_ADAPTER = ("collab_agent.chat_model", "collab_agent.callbacks", "collab_agent.serve")
"""The old paths that re-export the adapter, and the OpenAI-compatible server that wraps it."""


def test_the_old_import_paths_give_the_adapters_objects() -> None:
    import collab_agent
    from collab_agent import callbacks, chat_model, langchain
    from collab_agent.langchain import backends
    from collab_agent.langchain import callbacks as moved_callbacks

    assert chat_model.CollabChatModel is langchain.CollabChatModel
    assert collab_agent.CollabChatModel is langchain.CollabChatModel
    assert chat_model._LOCAL_BACKENDS is backends.LOCAL_BACKENDS
    assert callbacks.traced is moved_callbacks.traced
    assert callbacks.TracedBackend is moved_callbacks.TracedBackend


def test_only_the_adapter_its_old_paths_and_the_server_load_it() -> None:
    graph = _graph({"eager"}, with_packages=True)
    loaders = {}
    for module in MODULES:
        if module.startswith((ADAPTER, *MAY_LOAD_ADAPTER)):
            continue
        loaded = _loaded_by(module, graph)
        adapter = [m for m in loaded if m == ADAPTER or m.startswith(f"{ADAPTER}.")]
        if adapter:
            loaders[module] = _chain(adapter[0], loaded)
    assert loaders == {}
