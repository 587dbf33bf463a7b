// Take files from the upload box: hold back any that break the limits (so their data is
// never sent), clear the box so the same file can be uploaded again, and say how many
// files are being classified. The server checks every limit again.
window.dash_clientside = Object.assign({}, window.dash_clientside, {
    malaria: {
        takeUpload: function (contents, filenames, limits) {
            const noUpdate = window.dash_clientside.no_update;
            if (!contents || contents.length === 0) {
                return [noUpdate, noUpdate, noUpdate, noUpdate];
            }
            let batchBytes = 0;
            const kept = contents.map(function (content, index) {
                const comma = content.indexOf(",");
                const size = Math.floor(((content.length - comma - 1) * 3) / 4);
                const fits = index < limits.max_files &&
                    size <= limits.max_file_bytes &&
                    batchBytes + size <= limits.max_batch_bytes;
                if (!fits) {
                    return "dropped:" + size;
                }
                batchBytes += size;
                return content;
            });
            const count = contents.length;
            const text = "Classifying " + count + (count === 1 ? " file" : " files") + "…";
            return [{contents: kept, filenames: filenames}, null, null, text];
        }
    }
});
