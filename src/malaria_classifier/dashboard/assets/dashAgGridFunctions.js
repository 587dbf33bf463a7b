// Functions the results table (AG Grid) calls by name from its column definitions.
var dagfuncs = (window.dashAgGridFunctions = window.dashAgGridFunctions || {});

// File names with numbers compared as numbers (cell_9 before cell_10), like the cards.
dagfuncs.malariaNaturalCompare = function (left, right) {
    return String(left == null ? "" : left).localeCompare(
        String(right == null ? "" : right), undefined, {numeric: true, sensitivity: "base"}
    );
};
